"""The agent loop: a model plays a task's agent in the task's world, turn by turn.

Each turn renders the conversation in K2's format (k2jax.chat), generates with the cached decoder
until <|im_end|>, parses the reply's tool calls, runs them in the task's world and appends the
results, until the reply is a final answer (no tool call) or a budget runs out. The task's rubric
(`Task.check`) scores the final world and answer. Nothing the model writes crashes the loop:

  success        the rubric accepts the final answer and world
  wrong_state    a final answer, but the world is not in the goal state
  wrong_answer   the goal state, but the answer misses an expected value
  malformed_call a tool call that does not parse (no end marker, an id that is not
                 functions.{name}:{index}, arguments that are not a JSON object): the episode ends
  runaway        a reply without <|im_end|> within sampling.max_new_tokens: the episode ends
  max_turns      max_turns replies without a final answer
  max_tokens     the conversation would outgrow max_tokens (the context budget)

A call to an undeclared tool or with arguments outside its schema is answered with the world's
`{"error": ...}` (the agent may recover, as from a misspelt name); every bad call is recorded in
`call_errors` as (kind, why), kind one of CALL_ERRORS. `valid_calls` counts calls that parse,
name a declared tool and satisfy its schema (a misspelt name is a valid call the world rejects).

Episodes run batched: `batch_size` slots, each refilled with the next task when its episode ends,
and one generate call per turn of all live slots (padded to batch_size rows so one compiled
program serves every call of a prompt-length bucket). The token ids of each conversation are
kept exactly as the model read and wrote them, with a mask of the tokens it generated and their
log-probabilities under the model: what a policy-gradient update (RL) needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from k2jax import chat
from k2jax.agentic import messages as msg
from k2jax.agentic.schema import check_call
from k2jax.agentic.tasks import Task
from k2jax.decode import Generation

OUTCOMES = ("success", "wrong_state", "wrong_answer", "malformed_call", "runaway", "max_turns",
            "max_tokens")
CALL_ERRORS = ("malformed", "unknown_tool", "bad_arguments")

# (prompts, max_new_tokens, *, temperature, top_p, top_k, seed, stop_tokens, valid_vocab) ->
# Generation: k2jax.decode.generate with its (cfg, variables) bound, or a scripted fake.
Generate = Callable[..., Generation]


class Sampling(NamedTuple):
  """How replies are drawn: greedy at temperature 0 (see k2jax.decode.generate)."""

  max_new_tokens: int = 128  # per reply; a reply that reaches it is a runaway.
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0


@dataclasses.dataclass
class Episode:
  """One task played to its end (see the module docstring for `outcome`)."""

  task: Task
  messages: list[dict]  # system, user, then the agent's replies and the tool results.
  outcome: str
  reason: str  # the rubric's verdict, or what went wrong.
  turns: int  # replies generated.
  calls: int  # tool calls made, malformed ones included.
  valid_calls: int
  call_errors: list[tuple[str, str]]  # (kind in CALL_ERRORS, why) of each bad call.
  tokens: np.ndarray  # int32 [n]: the conversation, as the model read and wrote it.
  policy_mask: np.ndarray  # int32 [n]: 1 on the tokens the model generated.
  logprobs: np.ndarray  # float32 [n]: their log-probabilities (0 elsewhere).

  @property
  def reward(self) -> float:
    return float(self.outcome == "success")


class _Live:
  """An episode in progress."""

  def __init__(self, index: int, task: Task, tokenizer):
    self.index, self.task, self.world = index, task, task.new_world()
    self.messages = [msg.text("system", task.system), msg.text("user", task.user)]
    prompt = chat.encode_chat(tokenizer, self.messages, list(task.tools),
                              add_generation_prompt=True).ids.tolist()
    self.tokens, self.mask, self.logprobs = prompt, [0] * len(prompt), [0.0] * len(prompt)
    self.turns = self.calls = self.valid_calls = 0
    self.call_errors: list[tuple[str, str]] = []

  def extend(self, tokens: Sequence[int], logprobs: Sequence[float] | None = None):
    self.tokens += list(tokens)
    self.mask += [int(logprobs is not None)] * len(tokens)
    self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)

  def end(self, outcome: str, reason: str) -> Episode:
    return Episode(self.task, self.messages, outcome, reason, self.turns, self.calls,
                   self.valid_calls, self.call_errors, np.asarray(self.tokens, np.int32),
                   np.asarray(self.mask, np.int32), np.asarray(self.logprobs, np.float32))


GREEDY = Sampling()


def run_episodes(model: Generate, tokenizer, tasks: Sequence[Task], max_turns: int = 6,
                 sampling: Sampling = GREEDY, *, batch_size: int = 16,
                 max_tokens: int | None = None) -> list[Episode]:
  """Plays every task (see the module docstring); the episodes in the order of `tasks`.

  `tokenizer` is a K2-format one (k2jax.data.KimiTokenizer); `max_tokens` bounds a conversation
  (prompt and replies; None: no bound but the model's own, which `model` enforces).
  """
  if max_turns < 1 or batch_size < 1:
    raise ValueError(f"run_episodes: max_turns ({max_turns}) and batch_size ({batch_size}) must "
                     "be positive")
  end_id = tokenizer.special_ids[chat.END]
  episodes: list[Episode | None] = [None] * len(tasks)
  pending = list(enumerate(tasks))[::-1]
  slots: list[_Live] = []
  call = 0
  while pending or slots:
    while pending and len(slots) < batch_size:
      slots.append(_Live(*pending.pop(), tokenizer))
    for s in [s for s in slots if max_tokens is not None
              and len(s.tokens) + sampling.max_new_tokens > max_tokens]:
      episodes[s.index] = s.end("max_tokens", f"{len(s.tokens)} tokens + a reply of up to "
                                f"{sampling.max_new_tokens} exceed {max_tokens}")
      slots.remove(s)
    if not slots:
      continue
    prompts = [s.tokens for s in slots]
    gen = model(prompts + prompts[:1] * (batch_size - len(prompts)), sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                seed=sampling.seed + call, stop_tokens=[end_id], valid_vocab=tokenizer.vocab_size)
    call += 1
    for s, tokens, logprobs, finished in zip(list(slots), gen.tokens, gen.logprobs, gen.finished):
      episode = _step(s, tokens, logprobs, finished, tokenizer, max_turns, sampling)
      if episode is not None:
        episodes[s.index] = episode
        slots.remove(s)
  return episodes


def run_episode(model: Generate, tokenizer, task: Task, max_turns: int = 6,
                sampling: Sampling = GREEDY, max_tokens: int | None = None) -> Episode:
  """One task played by `model` (see `run_episodes`)."""
  return run_episodes(model, tokenizer, [task], max_turns, sampling, batch_size=1,
                      max_tokens=max_tokens)[0]


def _step(s: _Live, tokens: list[int], logprobs: list[float], finished: bool, tokenizer,
          max_turns: int, sampling: Sampling) -> Episode | None:
  """Takes one reply into episode `s`; the Episode when it ends there, else None."""
  s.turns += 1
  s.extend(tokens, logprobs)
  text = tokenizer.decode(tokens[:-1] if finished else tokens)
  if not finished:
    s.messages.append({"role": "assistant", "content": text})
    return s.end("runaway", f"no {chat.END} within {sampling.max_new_tokens} tokens")
  reply = chat.parse_tool_calls(text)
  s.messages.append(reply.message)
  if not reply.tool_calls:
    return _final(s, reply.content)
  s.calls += len(reply.tool_calls)
  broken = [c for c in reply.tool_calls if c["error"] is not None]
  if broken:
    s.call_errors += [("malformed", f"call {c['id']!r}: {c['error']}") for c in broken]
    return s.end("malformed_call", s.call_errors[0][1])
  results = []
  for c in reply.tool_calls:
    problem = check_call(s.world.declarations, c["name"], c["arguments"])
    if problem is None:
      s.valid_calls += 1
    else:
      s.call_errors.append(("unknown_tool" if c["name"] not in s.world.tools else "bad_arguments",
                            problem))
    results.append(msg.tool_result(c["id"], c["name"], s.world.call(c["name"], c["arguments"])))
  s.messages += results
  if s.turns >= max_turns:
    return s.end("max_turns", f"no final answer after {max_turns} replies")
  s.extend(tokenizer.encode(chat.render_continuation(results), allow_special=True))
  return None


def _final(s: _Live, answer: str) -> Episode:
  ok, reason = s.task.check(s.world, answer)
  if ok:
    return s.end("success", reason)
  return s.end("wrong_state" if s.world.state != s.task.goal else "wrong_answer", reason)

