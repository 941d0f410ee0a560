"""OpenAI-style chat messages with K2's tool-call ids.

A conversation is a list of messages: `{"role": "system" | "user", "content"}`, assistant turns
`{"role": "assistant", "content", "tool_calls"?}` where a tool call is `{"id", "type": "function",
"function": {"name", "arguments"}}` (arguments a dict), and tool results `{"role": "tool",
"tool_call_id", "name", "content"}`. K2 names a call `functions.{name}:{idx}`, idx counting the
calls of the whole conversation from 0; the ids must round-trip unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def call_id(name: str, index: int) -> str:
  """K2's id of the `index`-th tool call of a conversation (0-based) to tool `name`."""
  return f"functions.{name}:{index}"


def text(role: str, content: str) -> dict:
  return {"role": role, "content": content}


def tool_calls(calls: Sequence[tuple[str, Mapping[str, Any]]], first_index: int) -> dict:
  """An assistant turn calling (name, arguments) pairs, numbered from `first_index`."""
  return {
    "role": "assistant",
    "content": "",
    "tool_calls": [
      {"id": call_id(name, first_index + i), "type": "function",
       "function": {"name": name, "arguments": dict(arguments)}}
      for i, (name, arguments) in enumerate(calls)
    ],
  }


def tool_result(tool_call_id: str, name: str, content: str) -> dict:
  return {"role": "tool", "tool_call_id": tool_call_id, "name": name, "content": content}


def final_answer(messages: Sequence[dict]) -> str | None:
  """The content of the last message if it is an assistant turn without tool calls, else None."""
  last = messages[-1] if messages else {}
  if last.get("role") != "assistant" or last.get("tool_calls"):
    return None
  return last.get("content")
