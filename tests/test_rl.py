"""RL (k2jax.rl): the token budget, the temperature schedule, rollouts as batches (masks: prompt
and tool-result tokens get no gradient; a sample's log-prob is the sum of the per-token log-probs
recorded at sampling), a toy bandit learnt by both objectives with the real model, decoder and
train step, and config errors. The objectives' gradients in closed form: tests/test_losses.py."""

import functools
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_agent import _reply

import k2jax
from k2jax import agentic, chat, decode
from k2jax.rl import config as rl_config
from k2jax.rl import rollouts
from k2jax.train import ConfigError, build_optimizer, init_state, losses, make_train_step
from k2jax.train.metrics import read_metrics

LOGPROB = -0.25


class Script:
  """A generate function replaying each task's expert replies (found by the request in the
  prompt); rows at odd positions of a call prepend `filler` to a final answer. Records the batch
  sizes it saw."""

  def __init__(self, tok, tasks, filler=""):
    self.tok, self.filler, self.batches = tok, filler, []
    self.replies = {t.user: [_reply(m) for m in agentic.expert_messages(t)
                             if m["role"] == "assistant"] for t in tasks}

  def __call__(self, prompts, max_new_tokens, *, stop_tokens, **sampling):
    self.batches.append(len(prompts))
    out = decode.Generation([], [], [])
    for row, p in enumerate(prompts):
      text = self.tok.decode(p)
      user = next(u for u in self.replies if f"user{chat.MIDDLE}{u}{chat.END}" in text)
      reply = self.replies[user][text.count(chat.GENERATION_PROMPT) - 1]
      if row % 2 and chat.CALL_BEGIN not in reply:
        reply = self.filler + reply
      ids = self.tok.encode(reply, allow_special=True)[:max_new_tokens]
      out.tokens.append(ids)
      out.logprobs.append([LOGPROB] * len(ids))
      out.finished.append(ids[-1] in stop_tokens)
    return out


def _tasks(tag, n, exclude=()):
  found = [t for t in agentic.make_tasks("train", 300, seed=5)
           if (tag in t.tags if tag else not t.tags) and not set(exclude) & set(t.tags)]
  return found[:n]


def test_apply_budget_cuts_after_the_budget_th_policy_token():
  mask = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 0], np.int32)
  sample = rollouts.Sample(np.arange(10, dtype=np.int32), mask, mask * -0.5)
  cut, over = rollouts.apply_budget(sample, 3)
  assert over and cut.tokens.tolist() == list(range(7)) and cut.policy_mask.sum() == 3
  for budget in (0, 5, 9):  # no budget, exactly at it, under it: untouched
    same, over = rollouts.apply_budget(sample, budget)
    assert not over and same is sample


def test_over_long_samples_are_truncated_and_penalised(tok):
  """No-tool tasks answered by the expert, every second sample with 40 filler words first: with a
  budget between the two lengths, the long ones are cut to exactly the budget and get the
  penalty; the others keep reward 1. All samples of all tasks are sampled in one batch."""
  tasks = _tasks("no_tool", 3)
  model = Script(tok, tasks, filler="Well " * 40)
  short = max(len(tok.encode(r, allow_special=True)) for rs in model.replies.values() for r in rs)
  budget, penalty = short + 5, -0.5
  sampling = agentic.Sampling(max_new_tokens=256)
  ro = rollouts.collect(model, tok, tasks, 2, sampling, objective="kimi", length=768, max_turns=2,
                        budget=budget, penalty=penalty)
  assert model.batches == [6]
  np.testing.assert_array_equal(ro.rewards, [1.0, penalty] * 3)
  policy = ro.batch["policy_mask"].sum(axis=1)
  assert (policy[1::2] == budget).all() and (policy[0::2] < budget).all()
  np.testing.assert_allclose(ro.batch["advantage"], [(1 - penalty) / 2, -(1 - penalty) / 2] * 3)
  assert ro.stats["truncated_frac"] == 0.5 and ro.stats["reward_mean"] == (1 + penalty) / 2
  assert ro.stats["success"] == 0.5 and ro.stats["signal_frac"] == 1.0
  without = rollouts.collect(model, tok, tasks, 2, sampling, objective="kimi", length=768,
                             max_turns=2)
  assert without.rewards.tolist() == [1.0] * 6 and without.stats["truncated_frac"] == 0.0


def test_advantages_per_group():
  r = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], np.float32)
  kimi = rollouts.advantages(r, "kimi").reshape(3, 4)
  np.testing.assert_allclose(kimi, r - r.mean(1, keepdims=True), atol=1e-7)
  grpo = rollouts.advantages(r, "grpo").reshape(3, 4)
  np.testing.assert_allclose(grpo, (r - r.mean(1, keepdims=True))
                             / (r.std(1, keepdims=True) + rollouts.GRPO_EPS), rtol=1e-5)
  assert (grpo[1] == 0).all()


@pytest.mark.parametrize("objective", ["kimi", "grpo"])
def test_prompt_and_tool_result_tokens_get_no_gradient(tok, objective):
  """Multi-turn expert rollouts (tool calls and results): the policy mask is the SFT mask of the
  conversation (the assistant's tokens only), and the objective's gradient with respect to the
  logits is zero at every position whose target is a prompt or tool-result token."""
  tasks = _tasks("chain", 2, exclude=("recovery",))
  ro = rollouts.collect(Script(tok, tasks), tok, tasks, 2, agentic.Sampling(max_new_tokens=128),
                        objective=objective, length=768, max_turns=6)
  assert ro.rewards.tolist() == [1.0] * 4
  for row, task in zip(ro.batch["policy_mask"], [t for t in tasks for _ in range(2)]):
    ids, mask = chat.encode_chat(tok, agentic.expert_messages(task), list(task.tools))
    np.testing.assert_array_equal(row[:len(mask)], mask)
    assert (row[len(mask):] == 0).all()
  batch = {k: jnp.asarray(v) for k, v in ro.batch.items()}
  batch["advantage"] = jnp.asarray([1.0, -0.5, 0.25, -1.0])  # any advantage
  term = (losses.kimi_policy_term(0.5) if objective == "kimi" else losses.grpo_term(0.2))
  logits = jax.random.normal(jax.random.key(0), (*batch["tokens"][:, :-1].shape, 1024))
  old = losses.token_log_probs(logits, batch["tokens"][:, 1:]) + 0.05  # near pi_old: no clipping
  batch["old_logprobs"] = batch["policy_mask"] * jnp.pad(old, ((0, 0), (1, 0)))
  grad = jax.grad(lambda x: term.total({"logits": x}, batch))(logits)
  per_position = np.abs(np.asarray(grad)).sum(-1)
  target_is_policy = np.asarray(batch["policy_mask"][:, 1:]) == 1
  assert (per_position[~target_is_policy] == 0).all()
  tool_results = (~target_is_policy) & (np.cumsum(target_is_policy, axis=1) > 0)
  assert tool_results.sum() > 0  # tool results between the replies: covered above
  assert (per_position[target_is_policy] > 0).all()


TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2)


def _tiny(vocab, **fields):
  return k2jax.presets.get("k2_nano", vocab_size=vocab, dtype="float32", **TINY_MODEL, **fields)


def test_a_samples_log_prob_is_the_sum_of_its_recorded_token_log_probs(tok):
  """Real decoder rollouts at temperature 1: the train step's forward over the batch row gives
  each sample's log pi(y | x), summed over its policy tokens, equal to the sum of the per-token
  log-probs recorded at sampling."""
  cfg = _tiny(1024, max_position_embeddings=1024)
  variables = k2jax.init_variables(cfg, 0)
  tasks = _tasks("", 2)
  ro = rollouts.collect(functools.partial(decode.generate, cfg, variables), tok, tasks, 2,
                        agentic.Sampling(max_new_tokens=16, temperature=1.0, seed=3),
                        objective="kimi", length=1024, max_turns=2)
  batch = ro.batch
  logits, _ = k2jax.Transformer(cfg).apply(variables, **losses.model_inputs(batch))
  logp = np.asarray(losses.token_log_probs(logits, jnp.asarray(batch["tokens"][:, 1:])))
  mask = batch["policy_mask"][:, 1:] == 1
  assert batch["policy_mask"][:, 0].sum() == 0 and (mask.sum(1) >= 16).all()
  ours = np.where(mask, logp, 0).sum(1)
  recorded = np.where(mask, batch["old_logprobs"][:, 1:], 0).sum(1)
  np.testing.assert_allclose(ours, recorded, rtol=1e-5)


@pytest.mark.slow  # ~20 s per objective: the decoder's and the train step's compiles.
@pytest.mark.parametrize("objective", ["kimi", "grpo"])
def test_toy_bandit_reward_goes_from_near_0_to_near_1(objective):
  """The model must emit one token (of 32) after a fixed prompt: reward 1 for it, 0 otherwise.
  Sampled by the decoder at temperature 1, updated by the train step with MuonClip."""
  V, target, K = 32, 7, 32
  cfg = _tiny(V)
  c = rl_config.default_config()
  c.rl.objective = objective
  c.train.steps = 15
  c.optimizer.update(dict(lr=0.02, schedule="constant", warmup_steps=0))
  weights, terms = rl_config.loss_terms(c)
  tx, schedule = build_optimizer(c, cfg)
  step = make_train_step(cfg, tx, schedule, loss_weights=weights, terms=terms)
  state = init_state(cfg, tx, seed=0)
  prompt = [1, 2, 3]
  rewards = []
  for update in range(c.train.steps):
    gen = decode.generate(cfg, {"params": state.params, "router": state.router}, [prompt] * K, 1,
                          temperature=1.0, seed=update)
    r = np.array([float(t[0] == target) for t in gen.tokens], np.float32)
    rewards.append(r.mean())
    samples = [rollouts.Sample(np.array(prompt + t, np.int32), np.array([0, 0, 0, 1], np.int32),
                               np.array([0, 0, 0, *lp], np.float32))
               for t, lp in zip(gen.tokens, gen.logprobs)]
    batch = rollouts.policy_batch(samples, rollouts.advantages(r[None], objective), 4)
    state, _ = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  assert rewards[0] < 0.1 and np.mean(rewards[-5:]) > 0.9, rewards


def test_temperature_schedule_is_the_configs():
  c = rl_config.default_config()
  c.rl.update(dict(temperature=1.0, final_temperature=0.6, temperature_decay_steps=20))
  got = [rl_config.temperature(c, u) for u in (0, 5, 10, 20, 35)]
  np.testing.assert_allclose(got, [1.0, 0.9, 0.8, 0.6, 0.6])
  c.rl.temperature_decay_steps = 0
  assert rl_config.temperature(c, 7) == 1.0


@pytest.mark.parametrize("key, value, error", [
  ("rl.objective", "ppo", r"config\.rl\.objective must be one of \('kimi', 'grpo'\)"),
  ("rl.samples", 0, r"config\.rl\.samples must be an integer >= 1"),
  ("rl.clip_eps", 1.0, r"config\.rl\.clip_eps must be a number > 0\.0 and < 1\.0, got 1\.0$"),
  ("rl.tau", float("inf"), r"config\.rl\.tau must be a number > 0\.0, got inf$"),
  ("rl.budget_penalty", float("nan"),
   r"config\.rl\.budget_penalty must be a finite number, got nan$"),
  ("rl.ptx_weight", -1.0, r"config\.rl\.ptx_weight must be a number >= 0"),
  ("rl.grad_steps", 4, r"config\.train\.steps \(30\) must be a multiple of config\.rl\.grad_steps"),
  ("loss.cross_entropy", 1.0, r"config\.loss\.cross_entropy: in RL set config\.rl\.ptx_weight"),
  ("rl.bogus", 1, r"config\.rl\.bogus is not a known key"),
])
def test_config_errors_are_one_line(key, value, error):
  c = rl_config.default_config()
  c.train.steps, c.checkpoint.every_steps, c.mesh.data = 30, 6, 1
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=f"^{error}") as e:
    rl_config.validate(c)
  assert "\n" not in str(e.value)


REPO = pathlib.Path(__file__).parents[1]
TIMES = ("rollout_s", "update_s")


def _cli(workdir, root):
  args = [sys.executable, str(REPO / "experiments" / "rl.py"),
          f"--config={REPO / 'experiments' / 'configs' / 'k2_nano_rl.py'}", f"--workdir={workdir}",
          "--config.init_from=", f"--config.data.source={root / 'chats.jsonl'}",
          "--config.data.tokenizer=kimi", f"--config.data.tokenizer_path={root / 'tokenizer'}",
          "--config.data.read_threads=0", "--config.data.prefetch_batches=0",
          "--config.mesh.data=1", "--config.train.steps=4", "--config.train.batch_size=2",
          "--config.train.seq_len=511", "--config.train.eval_every=2",
          "--config.train.eval_batches=1", "--config.checkpoint.every_steps=2",
          "--config.optimizer.lr=3e-3", "--config.rl.prompts=2", "--config.rl.samples=2",
          "--config.rl.max_new_tokens=8", "--config.rl.max_turns=2", "--config.rl.eval_heldout=2",
          "--config.rl.eval_heldout_domain=1", "--config.rl.temperature_decay_steps=2",
          "--config.rl.ptx_weight=0.5", "--config.rl.budget=6"]
  tiny = {**TINY_MODEL, "intermediate_size": 384, "first_k_dense_replace": 1}  # the preset's
  return args + [f"--config.model.{k}={v}" for k, v in tiny.items()]


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMES} for r in read_metrics(workdir)]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_rewards_and_losses(tok, tmp_path):
  """A tiny random model from scratch: an uninterrupted run and one SIGKILLed after its update-3
  record (its last checkpoint: update 2), then rerun, write the same records (rewards, losses,
  log-ratios, held-out success), and the temperature follows the schedule. Three runs of
  experiments/rl.py, about a minute."""
  agentic.write_jsonl(str(tmp_path / "chats.jsonl"), agentic.make_tasks("train", 40, seed=2))
  tok.save(tmp_path / "tokenizer")
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  whole, broken = tmp_path / "whole", tmp_path / "broken"
  subprocess.run(_cli(whole, tmp_path), env=env, check=True, capture_output=True)
  proc = subprocess.Popen(_cli(broken, tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not any(
      r.get("update") == 3 for r in _records(broken)):
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before the signal"
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  out = subprocess.run(_cli(broken, tmp_path), env=env, check=True, capture_output=True,
                       text=True).stdout
  assert f"resumed from {broken / 'checkpoints' / '2'}" in out
  a, b = _records(whole), _records(broken)
  assert [r["update"] for r in a] == list(range(5))
  assert a == b
  assert {"reward_mean", "ptx_loss", "kimi", "log_ratio_mean", "heldout_success",
          "clipped_heads", "max_logit", "truncated_frac"} <= set(a[2])
  # k2_nano_rl.py decays 1.0 -> 0.6, here over 2 updates.
  np.testing.assert_allclose([r["temperature"] for r in a[1:]], [1.0, 0.8, 0.6, 0.6])


def test_cli_bad_override_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, str(REPO / "experiments" / "rl.py"),
                        f"--config={REPO / 'experiments' / 'configs' / 'k2_nano_rl.py'}",
                        f"--workdir={tmp_path / 'w'}", "--config.rl.samplez=3"],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [
    'error: bad config override: samplez Did you mean "samples" instead of "samplez"?']
