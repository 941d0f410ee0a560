"""`train_rl(config, workdir)`: RL in the tool worlds from an SFT checkpoint, end to end.

The setup is the training run's (k2jax.train.loop.Run: config checks, tokenizer and weights from
config.init_from, the PTX stream from config.data, mesh, MuonClip, resume from the latest
checkpoint). Each update u (0-based) then
  1. samples rl.samples episodes of each of its rl.prompts train-split tasks with the current
     policy (the agent loop, batched), at the temperature the schedule gives u, with a seed drawn
     from the state's rng and u (so a resumed run samples what the uninterrupted one did);
  2. turns them into policy rows (budget, rewards, group advantages), adds the PTX rows of the
     next config.data batch when rl.ptx_weight > 0, and takes rl.grad_steps optimizer steps on
     that batch with the objective (pi_old: the policy that sampled);
  3. records the rollout statistics, the step's metrics (the objective under its name, the PTX
     loss as ptx_loss, max_logit, clipped_heads, ...), the log-ratio log pi_new(y) / pi_old(y)
     per sample after the update, the temperature and the time taken;
  4. every train.eval_every updates (and before the first and after the last) plays the held-out
     tasks greedily through the agent loop: success and valid-call rate per split, and the PTX
     cross-entropy on config.data's validation batches;
and checkpoints every checkpoint.every_steps optimizer steps, at the end and on SIGTERM. The
checkpoint holds the state (its step, hence the task stream's and the temperature's position,
and its rng) and the PTX iterator: a run killed and resumed gives the same rewards and losses.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import decode
from k2jax.agentic import Sampling, make_tasks, run_episodes
from k2jax.agentic import evaluate as agent_eval
from k2jax.rl import config as rl_config
from k2jax.rl import rollouts
from k2jax.rl.plot import plot_rl
from k2jax.train import config as config_lib
from k2jax.train import losses
from k2jax.train.loop import Run, SigtermFlag, execute
from k2jax.train.metrics import read_metrics
from k2jax.train.plot import plot_run
from k2jax.train.step import make_eval_step, make_train_step

EVAL_SPLITS = ("heldout", "heldout_domain")


def train_rl(config, workdir: str) -> dict[str, Any]:
  """RL-trains config in workdir (resuming from its checkpoints); returns the final summary."""
  return execute(RLRun(config, workdir))


def _log_ratio_B(outputs, batch) -> jax.Array:
  """[B] log pi(y) / pi_old(y) per row, summed over its policy tokens."""
  mask_BT = batch["policy_mask"][:, 1:].astype(jnp.float32)
  logp_BT = losses.token_log_probs(outputs["logits"], batch["tokens"][:, 1:])
  return jnp.sum(mask_BT * (logp_BT - batch["old_logprobs"][:, 1:]), axis=-1)


def _rollout_rows(batch) -> jax.Array:
  return jnp.any(batch["policy_mask"] > 0, axis=-1).astype(jnp.float32)


# Statistics of the per-sample log-ratio, as terms of an eval step: mean, mean square, max |.|.
LOG_RATIO_TERMS = {
    "log_ratio_mean": losses.Term(lambda o, b: jnp.sum(_rollout_rows(b) * _log_ratio_B(o, b)),
                                  lambda b: jnp.sum(_rollout_rows(b))),
    "log_ratio_sq": losses.Term(lambda o, b: jnp.sum(_rollout_rows(b) * _log_ratio_B(o, b) ** 2),
                                lambda b: jnp.sum(_rollout_rows(b))),
    "log_ratio_absmax": losses.Term(
        lambda o, b: jnp.max(_rollout_rows(b) * jnp.abs(_log_ratio_B(o, b))),
        lambda b: jnp.float32(1)),
}


class RLRun(Run):
  """The training run's setup with an rl section; its own loop and report (module docstring)."""

  validate = staticmethod(rl_config.validate)

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    r = config.rl
    if "<|im_end|>" not in getattr(self.tokenizer, "special_ids", {}):
      raise config_lib.ConfigError(f"RL needs a K2-format tokenizer (config.init_from's or "
                                   f"data.tokenizer 'kimi'), not {self.tokenizer.name!r}")
    if self.start % r.grad_steps:
      raise config_lib.ConfigError(f"checkpoint step {self.start} is not a multiple of "
                                   f"config.rl.grad_steps ({r.grad_steps}); use another workdir")
    self.length = config.train.seq_len + 1
    self.tasks = make_tasks("train", config.train.steps // r.grad_steps * r.prompts, r.task_seed)
    self.eval_tasks = [t for split, n in zip(EVAL_SPLITS, (r.eval_heldout, r.eval_heldout_domain))
                       for t in make_tasks(split, n, r.eval_seed)]

  def _model(self):
    """The current policy as the agent loop's generate function."""
    variables = {"params": self.state.params, "router": self.state.router}
    return functools.partial(decode.generate, self.cfg, variables)

  def _seed(self, update: int) -> int:
    key = jax.random.fold_in(self.state.rng, update)
    return int(jax.random.randint(key, (), 0, 2 ** 31 - 1))

  def agent_eval(self) -> dict[str, float]:
    """Greedy held-out episodes: success and valid-call rate per split (and the table printed);
    the PTX cross-entropy on config.data's validation batches."""
    r, out = self.config.rl, {}
    if self.eval_tasks:
      episodes = run_episodes(self._model(), self.tokenizer, self.eval_tasks, r.max_turns,
                              Sampling(r.max_new_tokens), batch_size=r.prompts * r.samples,
                              max_tokens=self.length)
      summaries = {split: agent_eval.summarize([e for e in episodes if e.task.split == split])
                   for split in EVAL_SPLITS if any(e.task.split == split for e in episodes)}
      for split, s in summaries.items():
        out[f"{split}_success"] = s["all"]["success"]
        out[f"{split}_valid_call_rate"] = s["all"]["valid_call_rate"] or 0.0
        out[f"{split}_turns"] = s["all"]["mean_turns"]
      print(agent_eval.domain_table(summaries), flush=True)
    if self.eval_batches:
      out["ptx_eval_loss"] = self.evaluate(self.state)["eval_cross_entropy"]
    return out

  def loop(self) -> None:
    """Rollouts and updates from self.start to config.train.steps (module docstring)."""
    config, r, t = self.config, self.config.rl, self.config.train
    weights, terms = rl_config.loss_terms(config)
    train_step = make_train_step(
        self.cfg, self.tx, self.schedule, loss_weights=weights, terms=terms,
        grad_accum=t.grad_accum, grad_clip=config.optimizer.grad_clip,
        bias_update_rate=config.router.bias_update_rate, bias_centered=config.router.centered,
        mesh=self.mesh, state_shardings=self.state_sh)
    self.eval_step = make_eval_step(self.cfg, mesh=self.mesh)  # PTX validation cross-entropy.
    ratio_step = make_eval_step(self.cfg, dict.fromkeys(LOG_RATIO_TERMS, 1.0), LOG_RATIO_TERMS,
                                mesh=self.mesh)
    if self.start == 0 and t.eval_every and self.writer is not None:
      self.writer.write({"step": 0, "update": 0, **self.agent_eval()})
    every = config.checkpoint.every_steps
    with SigtermFlag() as sigterm:
      for step in range(self.start + r.grad_steps, t.steps + 1, r.grad_steps):
        update = step // r.grad_steps - 1
        t0 = time.perf_counter()
        temperature = rl_config.temperature(config, update)
        sampling = Sampling(r.max_new_tokens, temperature, r.top_p, seed=self._seed(update))
        ro = rollouts.collect(self._model(), self.tokenizer,
                              self.tasks[update * r.prompts:(update + 1) * r.prompts], r.samples,
                              sampling, objective=r.objective, length=self.length,
                              max_turns=r.max_turns, budget=r.budget, penalty=r.budget_penalty)
        batch = ro.batch
        if r.ptx_weight:
          batch = rollouts.with_ptx(batch, next(self.train_iter))
        data_state = self.train_iter.get_state()
        t1 = time.perf_counter()
        batch = self.put_batch(batch)
        for _ in range(r.grad_steps):
          self.state, metrics = train_step(self.state, batch)
        ratio = ratio_step(self.state.params, self.state.router, batch)
        record = self._record(step, update, metrics, ratio, ro.stats, temperature)
        record.update(rollout_s=t1 - t0, update_s=time.perf_counter() - t1)
        if t.eval_every and ((update + 1) % t.eval_every == 0 or step == t.steps):
          record.update(self.agent_eval())
        if self.writer is not None:
          self.writer.write(record)
        print(_line(record), flush=True)
        if step == t.steps or sigterm.raised or (every and step % every == 0):
          if self.ckpt.save(step, self.state, data_state):
            self.last_saved = step
        if sigterm.raised:
          self.stopped = f"SIGTERM at step {step}"
          print(f"SIGTERM: saved step {step}, exiting", flush=True)
          break

  def _record(self, step, update, metrics, ratio, stats, temperature) -> dict[str, Any]:
    """The update's metrics record; FloatingPointError (nothing saved) on a non-finite loss."""
    m = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    m = {k: (v.item() if v.ndim == 0 else v) for k, v in m.items()}
    for key in ("loss", "grad_norm"):
      if not math.isfinite(m[key]):
        where = f"step {self.last_saved}" if self.last_saved is not None else "none"
        raise FloatingPointError(f"step {step}: {key} is {m[key]}; stopping without saving "
                                 f"(last good checkpoint: {where})")
    if "cross_entropy" in m:
      m["ptx_loss"] = m.pop("cross_entropy")
    ratio = {k: float(v) for k, v in jax.device_get(ratio).items()}
    mean = ratio["log_ratio_mean"]
    return {"step": step, "update": update + 1, **m, **stats, "temperature": temperature,
            "log_ratio_mean": mean,
            "log_ratio_std": math.sqrt(max(ratio["log_ratio_sq"] - mean ** 2, 0.0)),
            "log_ratio_absmax": ratio["log_ratio_absmax"]}

  def report(self) -> dict[str, Any]:
    """The summary (first and last held-out evaluation); the plots rl.png and training.png."""
    summary = {"start_step": self.start, "stopped": self.stopped, "step": int(self.state.step)}
    if not self.primary:
      return summary
    records = read_metrics(self.workdir)
    evals = [r for r in records if "heldout_success" in r or "heldout_domain_success" in r]
    if evals:
      summary["first_eval"], summary["last_eval"] = evals[0], evals[-1]
    if any("loss" in r for r in records):
      tau = (self.config.optimizer.qk_clip_tau if self.config.optimizer.name == "muonclip"
             else None)
      summary["plot"] = str(plot_run(self.workdir, tau))
      summary["rl_plot"] = str(plot_rl(self.workdir))
    return summary


def _line(record: dict) -> str:
  """One console line of an update."""
  keys = ("reward_mean", "success", "valid_call_rate", "response_len", "truncated_frac",
          "temperature", "log_ratio_mean", "heldout_success", "heldout_domain_success",
          "heldout_valid_call_rate", "rollout_s", "update_s")
  return f"update {record['update']}: " + " ".join(
      f"{k} {record[k]:.3f}" for k in keys if k in record)
