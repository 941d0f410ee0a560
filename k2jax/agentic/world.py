"""A tool world: a JSON state and the tools an agent may call on it, as pure Python functions.

`World.call(name, arguments)` is what an agent's tool call runs; it never raises. Its result is
compact JSON: the tool's return value, or `{"error": ...}` for an unknown tool, arguments that do
not satisfy the tool's schema, or a domain error (an unknown name, no stock, a taken slot). A
domain error about a misspelt name adds `"did_you_mean": {argument: the closest known name}`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from k2jax.agentic.schema import check_call

CLOSE_MATCH_CUTOFF = 0.6  # difflib ratio above which a misspelt name gets a did_you_mean.


class ToolError(Exception):
  """A domain error the agent reads; `did_you_mean` maps an argument to the value meant."""

  def __init__(self, message: str, did_you_mean: Mapping[str, Any] | None = None):
    super().__init__(message)
    self.did_you_mean = dict(did_you_mean or {})


@dataclasses.dataclass(frozen=True)
class Tool:
  """A declaration (see `schema.declare`) and `fn(state, **arguments)`: it may change `state`,
  returns a JSON-able value and raises ToolError on a domain error."""

  declaration: dict
  fn: Callable[..., Any]

  @property
  def name(self) -> str:
    return self.declaration["function"]["name"]


def dumps(value: Any) -> str:
  """Compact JSON, non-ASCII kept: the text of every tool result."""
  return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def lookup(table: Mapping[str, Any], key: str, argument: str, what: str) -> Any:
  """`table[key]`; else a ToolError naming `what`, with the closest key as `argument`'s fix."""
  if key in table:
    return table[key]
  close = difflib.get_close_matches(key, list(table), n=1, cutoff=CLOSE_MATCH_CUTOFF)
  raise ToolError(f"unknown {what} {key!r}", {argument: close[0]} if close else None)


def simulate(state: dict, tool: Tool, **arguments: Any) -> tuple[dict, Any]:
  """(the state after `tool(**arguments)`, its result) on a copy of `state`: how goals are made."""
  state = copy.deepcopy(state)
  return state, tool.fn(state, **arguments)


class World:
  """A state (a JSON-able dict, changed in place by calls) and the tools declared to the agent."""

  def __init__(self, state: dict, tools: Sequence[Tool]):
    self.state = state
    self.tools = {tool.name: tool for tool in tools}

  @property
  def declarations(self) -> list[dict]:
    return [tool.declaration for tool in self.tools.values()]

  def call(self, name: str, arguments: dict | str) -> str:
    """Run tool `name` on the state; the result, or the error, as compact JSON."""
    problem = check_call(self.declarations, name, arguments)
    if problem is not None:
      return dumps({"error": problem})
    if isinstance(arguments, str):
      arguments = json.loads(arguments)
    try:
      return dumps(self.tools[name].fn(self.state, **arguments))
    except ToolError as e:
      fix = {"did_you_mean": e.did_you_mean} if e.did_you_mean else {}
      return dumps({"error": str(e), **fix})
