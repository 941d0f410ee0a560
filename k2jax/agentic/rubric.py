"""The rubric: does a transcript reach its task's goal? Tool calls replayed in a fresh world."""

from __future__ import annotations

import re
from collections.abc import Sequence

from k2jax.agentic.messages import final_answer


def mentions(answer: str, value: str) -> int | None:
  """Where the first mention of `value` in `answer` ends, or None. A mention is a whole token:
  '12' is not mentioned in '112', '12.5' or 'F12'."""
  match = re.search(rf"(?<![\w.]){re.escape(value)}(?!\w|\.\d)", answer)
  return None if match is None else match.end()


def judge(task, messages: Sequence[dict]) -> tuple[bool, str]:
  """(success, reason) of a transcript of `task` (a `tasks.Task`).

  Replays every assistant tool call in a fresh world of the task, in order; each tool message
  must hold exactly what the world returned for its call id. Then `task.check` on the final
  world and the last assistant message.
  """
  world = task.new_world()
  results = {}
  for message in messages:
    for call in message.get("tool_calls") or ():
      results[call["id"]] = world.call(call["function"]["name"], call["function"]["arguments"])
    if message["role"] != "tool":
      continue
    if results.pop(message["tool_call_id"], None) != message["content"]:
      return False, f"the result of {message['tool_call_id']} is not what the world returns"
  return task.check(world, final_answer(messages))
