"""Kimi K2's chat format: render a conversation, encode it with a loss mask, read tool calls back.

Messages are OpenAI-style dicts: `role` (system, user, assistant, tool), `content` (a string, a
list of {"type": "text", "text": ...} parts, or None), an optional `name`; an assistant's
`tool_calls` [{"id", "function": {"name", "arguments"}}] (arguments a dict or a JSON string); a
tool result's `tool_call_id`. The layout is K2-Instruct-0905's chat template (K2 report, arXiv
2507.20534, §3):

  [<|im_system|>tool_declare<|im_middle|>\\n  # Tools\\n  {tools JSON}<|im_end|>]   with tools
  [<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>]   when messages[0] is no system one
  <|im_{user|assistant|system}|>{name or role}<|im_middle|>{body}<|im_end|>   per message; tool
      results use <|im_system|>, their body is "## Return of {tool_call_id}\\n    {content}"
  an assistant's tool calls follow its content: <|tool_calls_section_begin|>, per call
      <|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>, then
      <|tool_calls_section_end|>
  <|im_assistant|>assistant<|im_middle|>   the generation prompt

JSON is json.dumps with non-ASCII kept and default separators. The last message gets no <|im_end|>
unless a generation prompt follows (the template's choice); `encode_chat` closes every message,
as a training target must. Tool-call ids are `functions.{name}:{index}`, the index counting calls
over the conversation; K2 expects them back unchanged, so they are kept verbatim both ways.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
END = "<|im_end|>"
MIDDLE = "<|im_middle|>"
GENERATION_PROMPT = f"<|im_assistant|>assistant{MIDDLE}"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENTS_BEGIN, CALL_END = (
  "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>")
_MARKERS = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}  # every other role: system's.
_SYSTEM_MARKER = "<|im_system|>"
_CALL_ID = re.compile(r"functions\.(?P<name>[^:\s]+):(?P<index>\d+)")


class ChatIds(NamedTuple):
  """A tokenized conversation: ids and the loss mask (1 on what the assistant wrote)."""

  ids: np.ndarray  # int32 [T]
  loss_mask: np.ndarray  # int32 [T]


class ParsedReply(NamedTuple):
  """An assistant reply read back: its text, its tool calls and the message it amounts to.

  Each call is {"id", "name", "arguments" (the parsed JSON object, None when unusable), "error"
  (None, or why the call cannot be run)}. `message` renders back to the reply (tool-call ids and
  argument strings verbatim), ready to extend the conversation.
  """

  content: str
  tool_calls: list[dict]
  message: dict


def render(messages: Sequence[dict], tools: Sequence[dict] | None = None,
           add_generation_prompt: bool = False, template: str | None = None) -> str:
  """The conversation as K2 reads it; with `template` (a jinja chat template, e.g. a checkpoint's
  chat_template.jinja) rendered by it the way transformers renders chat templates."""
  if template is not None:
    return _compile(template).render(messages=list(messages), tools=tools,
                                     add_generation_prompt=add_generation_prompt)
  return "".join(text for text, _ in _segments(messages, tools, add_generation_prompt, False))


def encode_chat(tokenizer: Any, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = False) -> ChatIds:
  """Token ids of `render(...)` with every message closed by <|im_end|>, and the loss mask: 1 on
  each assistant message's content, tool calls and closing <|im_end|>; 0 on role headers and on
  system, user and tool turns.

  `tokenizer` is a K2-format one (k2jax.data.KimiTokenizer). Special-token text is encoded as the
  special token wherever it appears, content included, as K2's own tokenizer does.
  """
  specials = getattr(tokenizer, "special_ids", {})
  missing = [t for t in (END, MIDDLE, SECTION_BEGIN) if t not in specials]
  if missing:
    raise ValueError(f"encode_chat: tokenizer {tokenizer.name!r} has no {missing[0]} token (use a "
                     "K2-format tokenizer)")
  ids, mask = [], []
  for text, train in _segments(messages, tools, add_generation_prompt, True):
    piece = tokenizer.encode(text, allow_special=True)
    ids += piece
    mask += [int(train)] * len(piece)
  return ChatIds(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def parse_tool_calls(text: str, tools: Sequence[dict] | None = None) -> ParsedReply:
  """The tool calls of an assistant reply (text generated after the generation prompt).

  A call is unusable, with a reason in its "error", when its end marker is missing, its id is not
  `functions.{name}:{index}`, its arguments are not a JSON object, or (given `tools`) it names an
  undeclared function. Never raises on a malformed reply.
  """
  text = text.removesuffix(END)
  content, begin, section = text.partition(SECTION_BEGIN)
  message = {"role": "assistant", "content": content}
  if not begin:
    return ParsedReply(content, [], message)
  names = None if tools is None else {t.get("function", t).get("name") for t in tools}
  calls, raw = [], []
  for chunk in section.partition(SECTION_END)[0].split(CALL_BEGIN)[1:]:
    call, arguments = _parse_call(chunk, names)
    calls.append(call)
    raw.append(arguments)
  if calls:
    message["tool_calls"] = [
      {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": a}}
      for c, a in zip(calls, raw)]
  return ParsedReply(content, calls, message)


def _parse_call(chunk: str, names: set[str] | None) -> tuple[dict, str]:
  """({"id", "name", "arguments", "error"}, the arguments text) of one call's text."""
  head, has_arguments, rest = chunk.partition(ARGUMENTS_BEGIN)
  raw, closed, _ = rest.partition(CALL_END)
  call_id, raw = head.strip(), raw.strip()
  m = _CALL_ID.fullmatch(call_id)
  name = m["name"] if m else ""
  arguments, error = None, None
  if not has_arguments:
    error = f"no {ARGUMENTS_BEGIN} after the call id"
  elif not closed:
    error = f"no {CALL_END} (the reply was cut off?)"
  elif not m:
    error = f"call id {call_id!r} is not functions.{{name}}:{{index}}"
  elif names is not None and name not in names:
    error = f"unknown function {name!r} (declared: {', '.join(sorted(map(str, names)))})"
  else:
    try:
      arguments = json.loads(raw)
    except json.JSONDecodeError as e:
      error = f"arguments are not valid JSON ({e})"
    else:
      if not isinstance(arguments, dict):
        arguments, error = None, f"arguments are a JSON {type(arguments).__name__}, not an object"
  return {"id": call_id, "name": name, "arguments": arguments, "error": error}, raw


def _segments(messages: Sequence[dict], tools: Sequence[dict] | None, add_generation_prompt: bool,
              close_last: bool) -> Iterator[tuple[str, bool]]:
  """(text, written by the assistant) pieces of the rendering; every boundary between pieces
  touches a special token, so tokenizing them one by one equals tokenizing their concatenation."""
  if tools:
    yield f"{_SYSTEM_MARKER}tool_declare{MIDDLE}\n  # Tools\n  {_json(tools)}{END}", False
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise ValueError(f"messages[{i}]: not a message dict with a string 'role'")
    role = m["role"]
    if i == 0 and role != "system":
      yield f"{_SYSTEM_MARKER}system{MIDDLE}{DEFAULT_SYSTEM}{END}", False
    yield f"{_MARKERS.get(role, _SYSTEM_MARKER)}{m.get('name') or role}{MIDDLE}", False
    yield _body(m, i), role == "assistant"
    if i < len(messages) - 1 or add_generation_prompt or close_last:
      yield END, role == "assistant"
  if add_generation_prompt:
    yield GENERATION_PROMPT, False


def _body(m: dict, i: int) -> str:
  content = _content(m.get("content"), i)
  if m["role"] == "tool":
    if "tool_call_id" not in m:
      raise ValueError(f"messages[{i}]: a tool result needs 'tool_call_id'")
    return f"## Return of {m['tool_call_id']}\n    {content}"
  if m["role"] != "assistant" or not m.get("tool_calls"):
    return content
  calls = []
  for j, call in enumerate(m["tool_calls"]):
    try:
      call_id, arguments = call["id"], call["function"]["arguments"]
    except (KeyError, TypeError):
      raise ValueError(f"messages[{i}].tool_calls[{j}]: needs 'id' and "
                       "'function': {'name', 'arguments'}") from None
    arguments = arguments if isinstance(arguments, str) else _json(arguments)
    calls.append(f"{CALL_BEGIN}{call_id}{ARGUMENTS_BEGIN}{arguments}{CALL_END}")
  return f"{content}{SECTION_BEGIN}{''.join(calls)}{SECTION_END}"


def _content(content: Any, i: int) -> str:
  if content is None or isinstance(content, str):
    return content or ""
  if isinstance(content, list) and all(
      isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str)
      for p in content):
    return "".join(p["text"] for p in content)
  raise ValueError(f"messages[{i}]: content must be a string, None or a list of "
                   '{"type": "text", "text": ...} parts')


def _json(x: Any) -> str:
  return json.dumps(x, ensure_ascii=False)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
  """A chat template compiled as transformers compiles them: sandboxed, trim_blocks,
  lstrip_blocks, loop controls, and a tojson that keeps non-ASCII."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template)
