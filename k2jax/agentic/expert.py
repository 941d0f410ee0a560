"""The scripted expert: runs a task's script in its world, reading results as it goes.

Each turn it issues the next step of the script with `R` arguments read from earlier results. A
step with an error result is retried once with the error's `did_you_mean` fixes applied; an error
it cannot fix, or a value it cannot read, ends the conversation with an apology (such a transcript
fails the rubric). The final answer is the task's answer template filled from the results.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from k2jax.agentic import messages as msg
from k2jax.agentic.domain import Call, R

History = Sequence[Sequence[tuple[Call, str]]]  # turns of (call, result) pairs.
SORRY = "Sorry, I could not do that"


def next_action(task, history: History) -> list[Call] | str:
  """The expert's next turn of `task` after `history`: calls, or the final answer."""
  done, failures = [], 0  # results of the steps done; failed turns in a row at the end.
  for turn in history:
    results = [json.loads(result) for _, result in turn]
    errors = [r["error"] for r in results if _error(r)]
    failures = failures + 1 if errors else 0
    if not errors:
      done.append(results)
  if failures:
    calls = [call for call, _ in history[-1]]
    retry = [Call(c.name, {**c.arguments, **_fixes(c, r)}) for c, r in zip(calls, results)]
    return f"{SORRY}: {errors[0]}" if failures > 1 or retry == calls else retry
  try:
    if len(done) < len(task.steps):
      return [Call(c.name, {k: _read(v, done) for k, v in c.arguments.items()})
              for c in task.steps[len(done)]]
    fields = {k: _text(_read(v, done)) for k, v in task.answer.fields.items()}
    return task.answer.text.format(**fields)
  except (LookupError, TypeError):
    return f"{SORRY}."


def expert_messages(task) -> list[dict]:
  """The expert's conversation of `task`: system, user, tool-call and tool turns, final answer."""
  world = task.new_world()
  messages = [msg.text("system", task.system), msg.text("user", task.user)]
  history, n_calls = [], 0
  while not isinstance(action := next_action(task, history), str):
    messages.append(msg.tool_calls([(c.name, c.arguments) for c in action], n_calls))
    turn = []
    for call, tool_call in zip(action, messages[-1]["tool_calls"]):
      result = world.call(call.name, call.arguments)
      messages.append(msg.tool_result(tool_call["id"], call.name, result))
      turn.append((call, result))
    history.append(turn)
    n_calls += len(action)
  messages.append(msg.text("assistant", action))
  return messages


def _error(result) -> bool:
  return isinstance(result, dict) and "error" in result


def _fixes(call: Call, result) -> dict:
  fixes = result.get("did_you_mean", {}) if _error(result) else {}
  return {k: v for k, v in fixes.items() if k in call.arguments}


def _read(value, done):
  if not isinstance(value, R):
    return value
  out = done[value.step][value.call]
  for key in value.path:
    if not isinstance(out, (dict, list)):
      raise TypeError(f"cannot index {out!r}")
    out = out[key]
  return out


def _text(value) -> str:
  return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
