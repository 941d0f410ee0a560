"""Chat with a K2-format checkpoint directory: K2's chat format, streamed replies, tool calls.

  python experiments/chat.py --checkpoint=path/to/Kimi-K2-Instruct --prompt="Hi!"
  python experiments/chat.py --checkpoint=DIR --tools=tools.json --prompt="Weather in Praha?"
  python experiments/chat.py --checkpoint=DIR                  # interactive; empty line ends
  python experiments/chat.py --checkpoint=DIR --conversations=chats.jsonl > replies.jsonl

The directory holds config.json, safetensors (FP8 ones are dequantized) and a K2-format tokenizer
(tiktoken.model, tokenizer_config.json; `k2jax.hf.save(..., tokenizer=)` writes them). A
conversation is rendered by the directory's chat template when it has one, else by k2jax.chat's
K2 format, and ends with the generation prompt; the reply streams until <|im_end|> and its tool
calls are parsed and printed. `--tools` is a JSON list of OpenAI-style tool declarations. A
conversations line is {"messages": [...], "tools": [...] (optional)}; lines are decoded in batches
and each reply comes out as one JSON line {"content", "tool_calls", "message", "finished"}.
"""

from __future__ import annotations

import codecs
import json
import pathlib
import sys
from typing import NamedTuple, TextIO

import numpy as np
from absl import app, flags

import k2jax.hf
from k2jax import chat, decode
from k2jax.data import KimiTokenizer


class Model(NamedTuple):
  cfg: k2jax.ModelConfig
  variables: dict
  tokenizer: KimiTokenizer


class Sampling(NamedTuple):
  max_new_tokens: int = 512
  temperature: float = 0.6
  top_p: float = 1.0
  seed: int = 0


def load(checkpoint: str, dtype: str | None = None) -> Model:
  """Config, weights and tokenizer of a checkpoint directory (the tokenizer first: fails fast)."""
  path = pathlib.Path(checkpoint)
  tok = k2jax.hf.load_tokenizer(path)
  if tok is None:
    raise ValueError(f"{path}: no tiktoken.model (a K2-format checkpoint directory holds "
                     "tiktoken.model and tokenizer_config.json next to the weights)")
  cfg, variables = k2jax.hf.load(path, dtype)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model's vocab_size "
                     f"is {cfg.vocab_size}")
  return Model(cfg, variables, tok)


def replies(model: Model, conversations: list[tuple[list[dict], list[dict] | None]],
            sampling: Sampling, out: TextIO | None = None) -> list[tuple[chat.ParsedReply, bool]]:
  """(parsed reply, finished at <|im_end|>) of each conversation, decoded as one batch; with
  `out` (one conversation only) the reply streams there as it is generated."""
  tok = model.tokenizer
  stops = (tok.special_ids[chat.END], tok.eos_id)
  prompts = [tok.encode(chat.render(messages, tools, add_generation_prompt=True,
                                    template=tok.chat_template), allow_special=True)
             for messages, tools in conversations]
  stream = None if out is None else _Stream(tok, stops, out)
  gen = decode.generate(model.cfg, model.variables, prompts, sampling.max_new_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                        stop_tokens=stops, valid_vocab=tok.vocab_size, callback=stream)
  results = []
  for tokens, finished, (_, tools) in zip(gen.tokens, gen.finished, conversations):
    text = tok.decode(tokens[:-1] if finished else tokens)
    results.append((chat.parse_tool_calls(text, tools), finished))
  return results


class _Stream:
  """Writes the single row's new tokens as they come (whole UTF-8 characters only)."""

  def __init__(self, tok: KimiTokenizer, stops: tuple[int, ...], out: TextIO):
    self.tok, self.stops, self.out = tok, stops, out
    self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def __call__(self, token_B: np.ndarray, live_B: np.ndarray):
    if live_B[0] and int(token_B[0]) not in self.stops:
      self.out.write(self.utf8.decode(self.tok.decode_bytes([int(token_B[0])])))
      self.out.flush()


def say(model: Model, messages: list[dict], tools: list[dict] | None, sampling: Sampling,
        out: TextIO) -> chat.ParsedReply:
  """Streams one reply to `out`, then a line per tool call; returns the parsed reply."""
  (parsed, finished), = replies(model, [(messages, tools)], sampling, out)
  out.write("\n" if finished else f" [stopped after {sampling.max_new_tokens} tokens]\n")
  for call in parsed.tool_calls:
    args = json.dumps(call["arguments"], ensure_ascii=False)
    out.write(f"tool call {call['id']}: {call['name']}({args})\n" if call["error"] is None else
              f"tool call {call['id']!r}: unusable, {call['error']}\n")
  return parsed


def repl(model: Model, tools: list[dict] | None, sampling: Sampling, system: str | None,
         inp: TextIO, out: TextIO):
  """A conversation on the terminal: a user line, the streamed reply, ...; an empty line ends."""
  messages = [] if system is None else [{"role": "system", "content": system}]
  while True:
    out.write("you> ")
    out.flush()
    line = inp.readline()
    if not line.strip():
      return
    messages.append({"role": "user", "content": line.rstrip("\n")})
    out.write("kimi> ")
    messages.append(say(model, messages, tools, sampling, out).message)


def run_jsonl(model: Model, file: str, tools: list[dict] | None, sampling: Sampling,
              batch_size: int, out: TextIO):
  """A reply per conversation of a JSONL file, as JSON lines, `batch_size` at a time."""
  conversations = []
  with open(file) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        conversations.append((list(record["messages"]), record.get("tools", tools)))
      except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{file} line {lineno}: not a JSON object with 'messages'") from None
  for i in range(0, len(conversations), batch_size):
    for parsed, finished in replies(model, conversations[i:i + batch_size], sampling):
      out.write(json.dumps({**parsed._asdict(), "finished": finished}, ensure_ascii=False) + "\n")


def _read_tools(file: str | None) -> list[dict] | None:
  if file is None:
    return None
  try:
    tools = json.loads(pathlib.Path(file).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--tools {file}: {e}") from None
  if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
    raise ValueError(f"--tools {file}: expected a JSON list of tool declarations")
  return tools


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    if f.prompt is not None and f.conversations is not None:
      raise ValueError("give at most one of --prompt and --conversations")
    tools = _read_tools(f.tools)
    model = load(f.checkpoint, f.dtype)
    sampling = Sampling(f.max_new_tokens, f.temperature, f.top_p, f.seed)
    if f.conversations is not None:
      run_jsonl(model, f.conversations, tools, sampling, f.batch_size, sys.stdout)
    elif f.prompt is not None:
      system = [] if f.system is None else [{"role": "system", "content": f.system}]
      say(model, system + [{"role": "user", "content": f.prompt}], tools, sampling, sys.stdout)
    else:
      repl(model, tools, sampling, f.system, sys.stdin, sys.stdout)
  except ValueError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":  # flags only here: the tests import this module.
  flags.DEFINE_string("checkpoint", None, "K2-format checkpoint directory.")
  flags.DEFINE_string("prompt", None, "One user message (default: an interactive session).")
  flags.DEFINE_string("conversations", None, "JSONL file of conversations to reply to.")
  flags.DEFINE_string("system", None, "System prompt (default: K2's).")
  flags.DEFINE_string("tools", None, "JSON file: a list of tool declarations.")
  flags.DEFINE_integer("max_new_tokens", 512, "Most tokens per reply.")
  flags.DEFINE_float("temperature", 0.6, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", 8, "Conversations decoded together (--conversations).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Weights and compute dtype (default: the checkpoint's).")
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main)
