"""Conversations as JSONL: one `{"messages", "tools", ...}` record per line.

The format users already have for chat data with tools (OpenAI-style messages, see messages.py;
`tools` the declarations, may be absent). The synthesiser writes it with the fields
`task_id, domain, kind, split` added; `read_jsonl` reads any file of that shape (checked by
`k2jax.chat.conversation_problem`), so external conversations go through the same path (the
training pipeline for `data.format = "chat"` reads them with the same check). A tool call's
arguments may be a dict or a JSON string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from absl import logging

from k2jax.agentic.expert import expert_messages
from k2jax.agentic.rubric import judge
from k2jax.chat import conversation_problem


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
