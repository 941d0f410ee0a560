"""The agent loop: scripted fake models replaying transcripts reach the rubric's verdict with exact
token bookkeeping; bad output ends or is recorded, never crashes; the real decoder plugs in."""

import functools
import json

import jax
import numpy as np
import pytest

import k2jax
from k2jax import agentic, chat, decode
from k2jax.agentic import agent
from k2jax.decode import Generation

LOGPROB = -0.5


def _reply(message: dict) -> str:
  """What a model writes for an assistant message: its rendering after the generation prompt."""
  return chat.render_continuation([message], add_generation_prompt=False).removeprefix(
    chat.GENERATION_PROMPT)


class Replay:
  """A generate function: each prompt gets the next scripted reply of its task (found by the
  task's request in the prompt), cut at max_new_tokens; records the batch sizes it saw."""

  def __init__(self, tok, scripts: dict[str, list[str]]):
    self.tok, self.scripts, self.batches = tok, scripts, []

  def __call__(self, prompts, max_new_tokens, *, stop_tokens, **sampling):
    self.batches.append(len(prompts))
    out = Generation([], [], [])
    for p in prompts:
      text = self.tok.decode(p)
      user = next(u for u in self.scripts if f"user{chat.MIDDLE}{u}{chat.END}" in text)
      turn = text.count(chat.GENERATION_PROMPT) - 1
      ids = self.tok.encode(self.scripts[user][turn], allow_special=True)[:max_new_tokens]
      finished = ids[-1] in stop_tokens
      out.tokens.append(ids)
      out.logprobs.append([LOGPROB] * len(ids))
      out.finished.append(finished)
    return out


def _distinct_tasks(n):
  """n train tasks with distinct requests, the first four covering every tag."""
  tasks, seen = [], set()
  for t in agentic.make_tasks("train", 400, seed=4):
    if t.user not in seen:
      seen.add(t.user)
      tasks.append(t)
  picked = [next(t for t in tasks if tag in t.tags)
            for tag in ("chain", "parallel", "recovery", "no_tool")]
  return (picked + [t for t in tasks if t not in picked])[:n]


def _arguments(messages):
  """Messages with every tool call's arguments as a dict (the loop keeps the generated string)."""
  out = json.loads(json.dumps(messages))
  for m in out:
    for c in m.get("tool_calls") or ():
      if isinstance(c["function"]["arguments"], str):
        c["function"]["arguments"] = json.loads(c["function"]["arguments"])
  return out


def test_replayed_expert_transcripts_succeed_with_exact_tokens(tok):
  tasks = _distinct_tasks(14)
  experts = {t.user: agentic.expert_messages(t) for t in tasks}
  model = Replay(tok, {u: [_reply(m) for m in ms if m["role"] == "assistant"]
                       for u, ms in experts.items()})
  episodes = agentic.run_episodes(model, tok, tasks, max_turns=6, batch_size=4)
  assert set(model.batches) == {4}  # one batch size: one compiled program per bucket.
  for task, ep in zip(tasks, episodes):
    expert = experts[task.user]
    assert ep.task is task and (ep.outcome, ep.reward) == ("success", 1.0), (task.id, ep.reason)
    assert _arguments(ep.messages) == _arguments(expert)
    ids, mask = chat.encode_chat(tok, expert, list(task.tools))
    np.testing.assert_array_equal(ep.tokens, ids)  # the whole conversation, token for token
    np.testing.assert_array_equal(ep.policy_mask, mask)  # generated = the SFT loss mask
    np.testing.assert_array_equal(ep.logprobs, np.where(mask == 1, LOGPROB, 0.0))
    n_calls = sum(len(m.get("tool_calls") or ()) for m in expert)
    assert ep.turns == sum(m["role"] == "assistant" for m in expert)
    # a misspelt name is a valid call the world answers with an error (recovery tasks)
    assert ep.calls == ep.valid_calls == n_calls and ep.call_errors == []


def test_a_wrong_argument_gets_the_rubrics_verdict(tok):
  task = next(t for t in _distinct_tasks(40) if t.domain == "food" and t.kind == "order"
              and not t.tags)
  expert = agentic.expert_messages(task)
  wrong = json.loads(json.dumps(expert))
  wrong[2]["tool_calls"][0]["function"]["arguments"]["quantity"] += 1
  ep = agentic.run_episode(Replay(tok, {task.user: [_reply(wrong[2]), _reply(wrong[-1])]}), tok,
                           task)
  assert (ep.outcome, ep.reward) == ("wrong_state", 0.0)
  assert agentic.judge(task, ep.messages) == (False, ep.reason)
  assert ep.reason.startswith("final state differs")


def _call(name, arguments, index=0, id_=None):
  return {"role": "assistant", "content": "", "tool_calls": [{
    "id": id_ or f"functions.{name}:{index}", "type": "function",
    "function": {"name": name, "arguments": arguments}}]}


@pytest.mark.parametrize("script, outcome, culprit", [
  (lambda t: [_reply(_call(t.tools[0]["function"]["name"], '{"x": ')), "Done."],
   "malformed_call", "arguments are not valid JSON"),
  (lambda t: [_reply(_call("get", "{}", id_="get_0")), "Done."],
   "malformed_call", "call id 'get_0' is not functions.{name}:{index}"),
  (lambda t: ["Let me see." + chat.SECTION_BEGIN + chat.CALL_BEGIN + "functions.get:0"
              + chat.ARGUMENTS_BEGIN + "{}" + chat.END],
   "malformed_call", "no <|tool_call_end|>"),
  (lambda t: ["I will think about it " * 40 + chat.END], "runaway", "no <|im_end|> within 64"),
  (lambda t: [_reply(_call("teleport", {}))] * 6, "max_turns", "no final answer after 3"),
  (lambda t: ["Sure."], "wrong_answer", "answer does not mention"),
])
def test_bad_output_ends_the_episode_with_a_recorded_reason(tok, script, outcome, culprit):
  task = next(t for t in _distinct_tasks(40) if t.domain == "shop" and t.kind == "price_stock")
  replies = [r if r.endswith(chat.END) else r + chat.END for r in script(task)]
  ep = agentic.run_episode(Replay(tok, {task.user: replies}), tok, task, max_turns=3,
                           sampling=agentic.Sampling(max_new_tokens=64))
  assert (ep.outcome, ep.reward) == (outcome, 0.0) and culprit in ep.reason, ep.reason
  if outcome == "malformed_call":
    assert ep.call_errors == [("malformed", ep.reason)] and ep.calls == 1
  generated = [tok.encode(r, allow_special=True)[:64] for r in replies[:ep.turns]]
  assert ep.policy_mask.sum() == sum(map(len, generated))
  assert len(ep.tokens) == len(ep.policy_mask) == len(ep.logprobs)


def test_invalid_calls_get_the_worlds_error_and_are_counted(tok):
  task = next(t for t in _distinct_tasks(40) if t.domain == "shop" and t.kind == "price_stock"
              and not t.tags)
  expert = agentic.expert_messages(task)
  name = task.tools[0]["function"]["name"]
  replies = [_reply(_call("teleport", {"to": "Mars"})), _reply(_call(name, {"nope": 1}, 1)),
             *[_reply(m) for m in expert if m["role"] == "assistant"]]
  ep = agentic.run_episode(Replay(tok, {task.user: replies}), tok, task)
  assert ep.outcome == "success" and ep.turns == len(replies)  # it recovers
  assert ep.calls == 2 + ep.valid_calls and len(ep.call_errors) == 2
  (kind0, why0), (kind1, why1) = ep.call_errors
  assert kind0 == "unknown_tool" and why0.startswith('unknown tool "teleport"')
  assert kind1 == "bad_arguments" and why1.startswith(f"bad arguments for {name}")
  results = [m["content"] for m in ep.messages if m["role"] == "tool"]
  assert [json.loads(r)["error"] for r in results[:2]] == [why0, why1]


def test_the_context_budget_ends_an_episode(tok):
  task = _distinct_tasks(1)[0]
  prompt = chat.encode_chat(tok, [{"role": "system", "content": task.system},
                                  {"role": "user", "content": task.user}], list(task.tools),
                            add_generation_prompt=True).ids
  ep = agentic.run_episode(Replay(tok, {task.user: []}), tok, task,
                           sampling=agentic.Sampling(max_new_tokens=32),
                           max_tokens=len(prompt) + 31)
  assert ep.outcome == "max_tokens" and ep.turns == 0
  np.testing.assert_array_equal(ep.tokens, prompt)


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_the_decoder_plays_episodes_and_its_logprobs_are_the_models(tok):
  """A tiny random model through k2jax.decode: episodes end without crashing, and the log-probs
  kept for the generated tokens are those of the model on the whole conversation."""
  cfg = k2jax.presets.get("k2_nano").replace(vocab_size=tok.vocab_size, num_hidden_layers=2,
                                            max_position_embeddings=1024)
  variables = k2jax.init_variables(cfg, 0)
  tasks = _distinct_tasks(3)
  model = functools.partial(decode.generate, cfg, variables)
  episodes = agentic.run_episodes(model, tok, tasks, sampling=agentic.Sampling(
    max_new_tokens=12, temperature=1.0), batch_size=2, max_tokens=cfg.max_position_embeddings)
  for ep in episodes:
    assert ep.outcome in agent.OUTCOMES and ep.turns >= 1
    logits, _ = k2jax.Transformer(cfg).apply(variables, ep.tokens[None, :-1])
    logp = np.asarray(jax.nn.log_softmax(logits[0]))[np.arange(len(ep.tokens) - 1), ep.tokens[1:]]
    generated = ep.policy_mask[1:] == 1
    assert generated.sum() >= 1 and ep.policy_mask[0] == 0
    np.testing.assert_allclose(ep.logprobs[1:][generated], logp[generated], atol=2e-3)
