"""Conversations as JSONL: one `{"messages", "tools", ...}` record per line.

The format users already have for chat data with tools (OpenAI-style messages, see messages.py;
`tools` the declarations, may be absent). The synthesiser writes it with the fields
`task_id, domain, kind, split` added; `read_jsonl` reads any file of that shape, so external
conversations go through the same path. A tool call's arguments may be a dict or a JSON string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from absl import logging

from k2jax.agentic.expert import expert_messages
from k2jax.agentic.rubric import judge

ROLES = ("system", "user", "assistant", "tool")


def write_jsonl(path: str, tasks: Iterable) -> dict[str, int]:
  """Writes the expert conversation of each task that passes its rubric; the counts of both."""
  counts = {"written": 0, "dropped": 0}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for task in tasks:
      messages = expert_messages(task)
      ok, reason = judge(task, messages)
      if not ok:
        logging.warning("dropped task %s (%s/%s): %s", task.id, task.domain, task.kind, reason)
        counts["dropped"] += 1
        continue
      record = {"messages": messages, "tools": list(task.tools), "task_id": task.id,
                "domain": task.domain, "kind": task.kind, "split": task.split}
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      counts["written"] += 1
  return counts


def read_jsonl(path: str) -> Iterator[dict]:
  """The records of a JSONL file of conversations, each checked; a bad one raises a ValueError."""
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} line {line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      problem = conversation_problem(record)
      if problem is not None:
        raise ValueError(f"{where}: {problem}")
      yield record


def conversation_problem(record) -> str | None:
  """Why `record` is not a conversation with tools (one line), or None."""
  if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
    return "no list field 'messages'"
  tools = record.get("tools", [])
  if not isinstance(tools, list) or not all(_is_declaration(t) for t in tools):
    return "'tools' is not a list of {'type': 'function', 'function': {'name', ...}}"
  if not record["messages"]:
    return "'messages' is empty"
  call_ids = set()
  for i, m in enumerate(record["messages"]):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      return f"message {i} has no role among {', '.join(ROLES)}"
    calls = m.get("tool_calls") or []
    if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and calls):
      return f"message {i} ({m['role']}) has no string content"
    if calls and (m["role"] != "assistant" or not all(_is_call(c) for c in calls)):
      return f"message {i}: tool_calls must be an assistant's list of {{'id', 'function'}}"
    call_ids.update(c["id"] for c in calls)
    if m["role"] == "tool" and m.get("tool_call_id") not in call_ids:
      return f"message {i}: tool_call_id {m.get('tool_call_id')!r} names no earlier call"
  return None


def _is_declaration(tool) -> bool:
  return isinstance(tool, dict) and isinstance(tool.get("function"), dict) and isinstance(
    tool["function"].get("name"), str)


def _is_call(call) -> bool:
  function = call.get("function") if isinstance(call, dict) else None
  return (isinstance(call.get("id"), str) and isinstance(function, dict)
          and isinstance(function.get("name"), str)
          and isinstance(function.get("arguments"), (dict, str)))
