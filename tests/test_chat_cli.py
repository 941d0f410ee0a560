"""experiments/chat.py end to end on a tiny K2-format checkpoint directory written by k2jax.hf.save.

The one-layer model has random weights, except that its attention and MLP output projections are
zero and its embedding and LM head hold a next-token table: greedy decoding after the generation
prompt then writes a known tool call, which the CLI must stream, stop at <|im_end|> and parse.
"""

import importlib.util
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import k2jax
import k2jax.hf
from k2jax import chat, data
from k2jax.data import tokenizers
from k2jax.paths import path_str

ROOT = pathlib.Path(__file__).parents[1]
TOOLS = [{"type": "function", "function": {
  "name": "get_weather", "description": "Weather in a city",
  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
REPLY = ("Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
         '<|tool_call_argument_begin|>{"city": "Praha"}<|tool_call_end|>'
         "<|tool_calls_section_end|>")
CALL_LINE = 'tool call functions.get_weather:0: get_weather({"city": "Praha"})\n'


def _spec():
  spec = importlib.util.spec_from_file_location("chat_cli", ROOT / "experiments" / "chat.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cli = _spec()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  words = np.random.default_rng(0).choice(list("abcdefghij"), (400, 4))
  corpus = [re.sub(r"<\|\w+\|>", "\n", REPLY) * 30, "Weather in Praha? Checking the city. " * 30,
            " ".join(map("".join, words))]
  tok = data.train_bpe(corpus, 600, chat_template=tokenizers.k2_chat_template())
  chain = ([tok.special_ids["<|im_middle|>"]] + tok.encode(REPLY, allow_special=True)
           + [tok.special_ids["<|im_end|>"]])
  assert len(set(chain[:-1])) == len(chain) - 1  # each token of the chain has one successor.
  cfg = k2jax.presets.get("k2_nano").replace(vocab_size=tok.vocab_size, num_hidden_layers=1,
                                            n_routed_experts=4, max_position_embeddings=512)
  assert len(chain) < cfg.hidden_size
  rng = np.random.default_rng(0)

  def plant(path, x):
    name = path_str(path)
    x = np.ones(x.shape, x.dtype) if name.endswith("scale") else rng.normal(size=x.shape)
    if name.endswith(("attn/o/kernel", "down/kernel", "experts/down")):
      return np.zeros_like(x)
    if name.endswith("embed/embedding"):
      x = np.zeros_like(x)
      x[chain[:-1], np.arange(len(chain) - 1)] = 1.0
    if name.endswith("lm_head/kernel"):
      x = np.zeros_like(x)
      x[np.arange(len(chain) - 1), chain[1:]] = 10.0
    return x

  variables = jax.tree_util.tree_map_with_path(
    lambda path, x: plant(path, x).astype(x.dtype), k2jax.abstract_variables(cfg))
  path = tmp_path_factory.mktemp("k2_tiny")
  k2jax.hf.save(path, cfg, variables, tokenizer=tok)
  (path / "tools.json").write_text(json.dumps(TOOLS))
  return path, tok


def test_hf_save_writes_the_tokenizer_next_to_the_weights(checkpoint, tmp_path):
  path, tok = checkpoint
  assert {"config.json", "model.safetensors", "tiktoken.model", "tokenizer_config.json",
          "chat_template.jinja"} <= {p.name for p in path.iterdir()}
  config = json.loads((path / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
  back = k2jax.hf.load_tokenizer(path)
  assert back.special_ids == tok.special_ids and back.chat_template == tok.chat_template
  assert back.encode(REPLY, allow_special=True) == tok.encode(REPLY, allow_special=True)
  assert k2jax.hf.load_tokenizer(tmp_path) is None
  cfg, variables = k2jax.hf.load(path)
  with pytest.raises(ValueError, match="the tokenizer has 600 ids, more than the model's"):
    k2jax.hf.save(tmp_path, cfg.replace(vocab_size=512), variables, tokenizer=tok)
  with pytest.raises(ValueError, match=f"{tmp_path}: no tiktoken.model"):
    cli.load(str(tmp_path))


def test_cli_streams_the_reply_and_prints_the_tool_call(checkpoint):
  path, _ = checkpoint
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, str(ROOT / "experiments" / "chat.py"), f"--checkpoint={path}",
     f"--tools={path / 'tools.json'}", "--prompt=Weather in Praha?", "--temperature=0",
     "--max_new_tokens=64"], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout == REPLY + "\n" + CALL_LINE


def test_repl_keeps_the_conversation_and_jsonl_replies_in_a_batch(checkpoint, tmp_path):
  path, tok = checkpoint
  model = cli.load(str(path))
  greedy = cli.Sampling(max_new_tokens=64, temperature=0.0)
  out = io.StringIO()
  cli.repl(model, TOOLS, greedy, "Be brief.", io.StringIO("Weather?\nAnd tomorrow?\n\n"), out)
  assert out.getvalue() == f"you> kimi> {REPLY}\n{CALL_LINE}" * 2 + "you> "
  file = tmp_path / "chats.jsonl"
  file.write_text(json.dumps({"messages": [{"role": "user", "content": "Weather?"}],
                              "tools": TOOLS}) + "\n\n" +
                  json.dumps({"messages": [{"role": "system", "content": "Hi."},
                                           {"role": "user", "content": "A longer question?"}]}))
  out = io.StringIO()
  cli.run_jsonl(model, str(file), None, greedy, 8, out)
  lines = [json.loads(line) for line in out.getvalue().splitlines()]
  assert len(lines) == 2 and all(line["finished"] for line in lines)
  for line in lines:
    assert line["content"] == "Checking."
    assert [(c["id"], c["arguments"], c["error"]) for c in line["tool_calls"]] == [
      ("functions.get_weather:0", {"city": "Praha"}, None)]
    assert chat.render([line["message"]]).endswith(REPLY)
  file.write_text("[1, 2]\n")
  with pytest.raises(ValueError, match="chats.jsonl line 1: not a JSON object with 'messages'"):
    cli.run_jsonl(model, str(file), None, greedy, 8, out)


def test_a_reply_cut_short_reports_the_unfinished_call(checkpoint):
  path, tok = checkpoint
  model = cli.load(str(path))
  n = len(tok.encode("Checking.<|tool_calls_section_begin|><|tool_call_begin|>"
                     "functions.get_weather:0<|tool_call_argument_begin|>", allow_special=True))
  out = io.StringIO()
  parsed = cli.say(model, [{"role": "user", "content": "Weather?"}], TOOLS,
                   cli.Sampling(max_new_tokens=n + 1, temperature=0.0), out)
  assert out.getvalue().startswith("Checking.<|tool_calls_section_begin|>")
  assert f"[stopped after {n + 1} tokens]\ntool call 'functions.get_weather:0': unusable, no " \
         "<|tool_call_end|>" in out.getvalue()
  assert parsed.tool_calls[0]["error"].startswith("no <|tool_call_end|>")
