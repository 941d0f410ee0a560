"""Tool declarations (OpenAI-style JSON schema) and the validator that judges a call against them.

A declaration is `{"type": "function", "function": {"name", "description", "parameters"}}` with
`parameters` a JSON schema of an object. The validator reads the subset the worlds use: `type`
(string, integer, number, boolean, array, object), `enum`, `minimum`, `maximum`, `properties`,
`required`, `items`; an object may hold no key its `properties` does not list. An integer is a
JSON integer (not 2.0, not a boolean); a number is any JSON number but a boolean.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

_TYPES = {
  "string": (str,),
  "integer": (int,),
  "number": (int, float),
  "boolean": (bool,),
  "array": (list,),
  "object": (dict,),
}


def declare(name: str, description: str, /, **properties: dict) -> dict:
  """The declaration of tool `name`; every keyword is a parameter (its schema), all required."""
  parameters = {"type": "object", "properties": properties, "required": list(properties)}
  return {
    "type": "function",
    "function": {"name": name, "description": description, "parameters": parameters},
  }


def validate_arguments(schema: dict, arguments: Any) -> str | None:
  """Why `arguments` do not satisfy the JSON schema `schema` (one line), or None when they do."""
  return _problem(schema, arguments, "")


def check_call(declarations: Sequence[dict], name: Any, arguments: Any) -> str | None:
  """Why a call is not valid against `declarations`, or None when it is.

  Valid: `name` is a declared tool, `arguments` is a JSON object (a dict, or a string holding
  one) and satisfies that tool's parameter schema.
  """
  tools = {d["function"]["name"]: d["function"] for d in declarations}
  if not isinstance(name, str) or name not in tools:
    return f"unknown tool {_show(name)}; tools: {', '.join(tools)}"
  if isinstance(arguments, str):
    try:
      arguments = json.loads(arguments)
    except ValueError:
      return f"arguments of {name} are not valid JSON"
  problem = validate_arguments(tools[name]["parameters"], arguments)
  return None if problem is None else f"bad arguments for {name}: {problem}"


def _problem(schema: dict, value: Any, where: str) -> str | None:
  name = repr(where) if where else "arguments"
  kind = schema.get("type")
  if kind is not None and not _is(kind, value):
    return f"{name} must be of type {kind}, got {_show(value)}"
  if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
    return f"{name} must be one of {', '.join(map(str, schema['enum']))}, got {_show(value)}"
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if number and "minimum" in schema and value < schema["minimum"]:
    return f"{name} must be at least {schema['minimum']}, got {_show(value)}"
  if number and "maximum" in schema and value > schema["maximum"]:
    return f"{name} must be at most {schema['maximum']}, got {_show(value)}"
  if kind == "object":
    properties = schema.get("properties", {})
    for key in schema.get("required", ()):
      if key not in value:
        return f"missing {_join(where, key)!r}"
    for key, item in value.items():
      if key not in properties:
        return f"unexpected {_join(where, key)!r}"
      problem = _problem(properties[key], item, _join(where, key))
      if problem is not None:
        return problem
  if kind == "array" and "items" in schema:
    for i, item in enumerate(value):
      problem = _problem(schema["items"], item, f"{where}[{i}]")
      if problem is not None:
        return problem
  return None


def _is(kind: str, value: Any) -> bool:
  if kind not in _TYPES:
    raise ValueError(f"schema type {kind!r} is not one of {', '.join(_TYPES)}")
  return isinstance(value, _TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))


def _same(a: Any, b: Any) -> bool:
  return type(a) is type(b) and a == b


def _show(value: Any, limit: int = 40) -> str:
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _join(where: str, key: str) -> str:
  return f"{where}.{key}" if where else key
