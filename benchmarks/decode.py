"""Decode benchmark: the compressed MLA cache vs recomputing the full forward, and streamed loading.

1. Tokens/s of cached decoding (one jitted loop of `--steps` steps, batch 1, starting at context L;
   kv_b absorbed, only the latent and the rotary key cached) against recomputing the full forward
   over the L-token context for every new token, at several L. Each round times both back to back
   (the machine is shared); the table gives medians.
2. Cache bytes per token and layer vs a per-head K/V cache, for the benchmarked preset and K2.
3. Peak host memory of `k2jax.hf.load` on a synthetic ~1 GB float32 checkpoint: a fresh
   subprocess reports its RSS after warming up jax and its peak after loading (VmHWM: getrusage's
   ru_maxrss of a child also counts the parent it was forked from); ratio = (peak - before) /
   parameter bytes.
4. With `--mtp_workdir` (a run trained with MTP layers, e.g. experiments/configs/k2_nano_mtp.py):
   self-speculative decoding (`generate(..., speculative="mtp")`) against plain cached greedy
   decoding, side by side: batch 1, prompts = the first 64 tokens of validation rows, each
   continued by `--spec_tokens` tokens both ways in turn, per round; the draft acceptance rate,
   tokens per main-model step, whether the outputs are identical, and the speedup of the medians;
   and what one step costs: jitted loops of 128 steps of the main model's cached forward over one
   token (a plain step) and over two (a verification), and of the MTP layer over two positions
   after the latter (a speculative step without its bookkeeping), medians over rounds.

Run: python benchmarks/decode.py [--preset k2_small] [--contexts 128,512,1024]
     [--mtp_workdir workdirs/k2_nano_mtp] [--markdown]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

import k2jax.hf
from k2jax import data as data_lib
from k2jax import presets
from k2jax.config import ModelConfig
from k2jax.decode import generate
from k2jax.model import Transformer, abstract_variables, init_variables, mtp
from k2jax.model.transformer import init_cache
from k2jax.perf import time_fn
from k2jax.train.workdir import load_latest

SPEC_PROMPT_TOKENS = 64

# ~1 GB of float32 parameters (embeddings, 2 dense + 2 MoE layers of 64 experts).
RSS_CONFIG = ModelConfig(
    vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
    num_hidden_layers=4, num_attention_heads=8, n_routed_experts=64, num_experts_per_tok=4,
    first_k_dense_replace=2, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096)

_RSS_CHILD = """
import json, pathlib, re, sys
import jax
import k2jax.hf
from k2jax.model import abstract_variables


def status(key):
  text = open("/proc/self/status").read()
  return int(re.search(key + r":\\s+(\\d+) kB", text).group(1)) * 1024


config = json.loads((pathlib.Path(sys.argv[1]) / "config.json").read_text())
abstract_variables(k2jax.hf.config_from_hf(config))
before, peak_before = status("VmRSS"), status("VmHWM")
cfg, variables = k2jax.hf.load(sys.argv[1])
print(json.dumps({"before": before, "peak_before": peak_before, "peak": status("VmHWM"),
                  "params": sum(x.nbytes for x in jax.tree.leaves(variables))}))
"""


def cache_bytes_per_token(cfg: ModelConfig, itemsize: int = 2) -> tuple[int, int]:
  """(compressed, per-head K/V) cache bytes per token and layer."""
  mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  kv = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  return mla * itemsize, kv * itemsize


def decode_loop(cfg: ModelConfig, steps: int):
  """Jitted: `steps` greedy cached decode steps from position `start`; returns the tokens."""
  model = Transformer(cfg)

  @jax.jit
  def run(variables, cache, token_B, start):
    def body(i, carry):
      token_B, cache, out_BN = carry
      (logits_B1V, _), mutated = model.apply(
          {**variables, "cache": cache}, token_B[:, None],
          jnp.full((token_B.shape[0], 1), start + i), decode=True, mutable=["cache"])
      token_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
      return token_B, mutated["cache"], out_BN.at[:, i].set(token_B)

    out_BN = jnp.zeros((token_B.shape[0], steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (token_B, cache, out_BN))[2]

  return run


def bench_decode(cfg: ModelConfig, contexts: list[int], steps: int, rounds: int) -> list[dict]:
  variables = init_variables(cfg, 0)
  forward = jax.jit(lambda v, t: Transformer(cfg).apply(v, t)[0][:, -1])
  loop = decode_loop(cfg, steps)
  rows = []
  for L in contexts:
    cache = jax.tree.map(lambda x: jnp.full_like(x, 0.1), init_cache(cfg, 1, L + steps))
    tokens = jax.random.randint(jax.random.key(1), (1, L), 0, cfg.vocab_size)
    token = jnp.zeros((1,), jnp.int32)
    cached, full = [], []
    for _ in range(rounds):
      cached.append(time_fn(loop, variables, cache, token, L, reps=3) / steps)
      full.append(time_fn(forward, variables, tokens, reps=3))
    c, f = statistics.median(cached), statistics.median(full)
    rows.append({"context": L, "cached_tok_s": 1 / c, "recompute_tok_s": 1 / f, "speedup": f / c})
  return rows


def bench_load_rss() -> dict:
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
                           abstract_variables(RSS_CONFIG))
  with tempfile.TemporaryDirectory() as d:
    k2jax.hf.save(d, RSS_CONFIG, variables, max_shard_size="400MB")
    files = len(list(pathlib.Path(d).glob("*.safetensors")))
    del variables
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, d], capture_output=True, text=True,
                         check=True, env=env)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  r.update(files=files, ratio=(r["peak"] - r["before"]) / r["params"])
  return r


def bench_speculative(workdir: str, prompts: int, new_tokens: int, rounds: int,
                      dtypes: list[str]) -> list[dict]:
  """Plain vs MTP-speculative greedy decoding of a trained run, per compute dtype (see 4.)."""
  cfg, variables, tok, config = load_latest(workdir)
  rows_it = data_lib.make_iterator(config.data, tok, "validation", prompts, SPEC_PROMPT_TOKENS,
                                   config.seed)
  batch = [row[:SPEC_PROMPT_TOKENS].tolist() for row in next(rows_it)["tokens"]]
  rows_it.close()
  out = []
  for dtype in dtypes:
    run = functools.partial(generate, cfg.replace(dtype=dtype), variables,
                            max_new_tokens=new_tokens, valid_vocab=tok.vocab_size)
    run([batch[0]]), run([batch[0]], speculative="mtp")  # compile both.
    plain_s, spec_s = [], []
    for _ in range(rounds):
      plain_s.append(0.0)
      spec_s.append(0.0)
      plain, spec = [], []
      for prompt in batch:
        t0 = time.perf_counter()
        plain.append(run([prompt]))
        plain_s[-1] += time.perf_counter() - t0
        t0 = time.perf_counter()
        spec.append(run([prompt], speculative="mtp"))
        spec_s[-1] += time.perf_counter() - t0
    made = sum(len(g.tokens[0]) for g in plain)
    drafted, accepted = (sum(getattr(g, k)[0] for g in spec) for k in ("drafted", "accepted"))
    p, sp = statistics.median(plain_s), statistics.median(spec_s)
    costs = step_costs(cfg.replace(dtype=dtype), variables, rounds)
    out.append({"dtype": dtype, "plain_tok_s": made / p, "spec_tok_s": made / sp, **costs,
                "speedup": p / sp, "acceptance": accepted / drafted,
                "tokens_per_step": (made - len(batch)) / drafted,
                "identical": all(a.tokens == b.tokens for a, b in zip(plain, spec)),
                "prompts": len(batch), "new_tokens": new_tokens, "rounds": rounds,
                "params": sum(x.size for x in jax.tree.leaves(variables["params"]))})
  return out


def step_costs(cfg: ModelConfig, variables: dict, rounds: int, steps: int = 128) -> dict:
  """ms per step of the main model's cached forward over 1 and 2 tokens, and of the latter
  followed by the MTP layer over the same 2 positions (loops of `steps`, at context 64)."""
  model, length = Transformer(cfg), SPEC_PROMPT_TOKENS + steps + 2
  cache, mtp_cache = init_cache(cfg, 1, length), mtp.init_cache(cfg, 1, length)

  def loop(tokens: int, draft: bool):
    @jax.jit
    def run(variables, cache, mtp_cache):
      def body(i, carry):
        cache, mtp_cache, token_B2 = carry
        positions_B2 = SPEC_PROMPT_TOKENS + i + jnp.arange(2)[None, :tokens]
        (logits, _), mutated = model.apply(
            {**variables, "cache": cache}, token_B2[:, :tokens], positions_B2, decode=True,
            mutable=["cache", "intermediates"])
        token_B2 = jnp.broadcast_to(jnp.argmax(logits[:, -1:], -1), (1, 2)).astype(jnp.int32)
        if draft:
          logits, mtp_cache = mtp.draft_logits(
              cfg, variables, mtp_cache, mutated["intermediates"]["hidden_BTD"][0], token_B2,
              positions_B2)
          token_B2 = token_B2.at[:, 1].set(jnp.argmax(logits[:, 1], -1).astype(jnp.int32))
        return mutated["cache"], mtp_cache, token_B2

      return jax.lax.fori_loop(0, steps, body, (cache, mtp_cache, jnp.zeros((1, 2), jnp.int32)))

    return run

  loops = {"one_ms": loop(1, False), "two_ms": loop(2, False), "two_mtp_ms": loop(2, True)}
  times = {k: [] for k in loops}
  for _ in range(rounds):
    for k, f in loops.items():
      times[k].append(time_fn(f, variables, cache, mtp_cache, reps=1) / steps * 1e3)
  return {k: statistics.median(v) for k, v in times.items()}


def markdown(cfg_name: str, cfg: ModelConfig, rows: list[dict], steps: int, rss: dict) -> str:
  mine, mine_kv = cache_bytes_per_token(cfg)
  k2, k2_kv = cache_bytes_per_token(presets.get("kimi_k2"))
  at512 = [r for r in rows if r["context"] == 512]
  intro = (
      f"`python benchmarks/decode.py --markdown`: {cfg_name}, batch 1, float32. Cached: one "
      f"jitted loop of {steps} greedy steps starting at the given context (compressed MLA cache, "
      "kv_b absorbed); recompute: one jitted full forward over the context per new token. "
      "Medians over rounds, both timed back to back; the 2 CPU cores are shared with other "
      "jobs.")
  lines = [
      "## Decode and checkpoint loading (benchmarks/decode.py)", "", textwrap.fill(intro, 100), "",
      "| context | cached tokens/s | recompute tokens/s | speedup |", "|---|---|---|---|"]
  lines += [f"| {r['context']} | {r['cached_tok_s']:.1f} | {r['recompute_tok_s']:.2f} | "
            f"{r['speedup']:.1f}x |" for r in rows]
  notes = [
      f"- Cache per token and layer (bf16): {cfg_name} {mine} B vs {mine_kv} B per-head K/V "
      f"({mine_kv / mine:.1f}x); Kimi K2 {k2} B ({k2 // 2} numbers) vs {k2_kv} B "
      f"({k2_kv // 2} numbers), {k2_kv / k2:.1f}x smaller.",
      f"- `k2jax.hf.load` of a {rss['params'] / 2**30:.2f} GiB float32 checkpoint "
      f"({rss['files']} shards): peak RSS rose {(rss['peak'] - rss['before']) / 2**30:.2f} GiB "
      f"over the process's {rss['before'] / 2**20:.0f} MiB after warm-up: "
      f"{rss['ratio']:.2f}x the parameter bytes.",
  ]
  if at512:
    ok = "met" if at512[0]["speedup"] >= 10 else "NOT met"
    notes.append(f"- Goals: >= 10x faster than recompute at 512 tokens: {ok} "
                 f"({at512[0]['speedup']:.1f}x); RSS ratio <= 1.3: "
                 f"{'met' if rss['ratio'] <= 1.3 else 'NOT met'} ({rss['ratio']:.2f}).")
  lines += [""] + [textwrap.fill(n, 100, subsequent_indent="  ") for n in notes]
  return "\n".join(lines)


def speculative_markdown(workdir: str, rows: list[dict]) -> str:
  r0 = rows[0]
  intro = (
      f"`python benchmarks/decode.py --mtp_workdir {workdir} --markdown`: the run's latest "
      f"checkpoint ({r0['params'] / 1e6:.2f}M parameters with its MTP layer), batch 1, "
      f"{r0['prompts']} prompts (the first {SPEC_PROMPT_TOKENS} tokens of validation rows), "
      f"each continued by {r0['new_tokens']} greedy tokens plainly (compressed MLA cache, one "
      "token per step) and with `speculative=\"mtp\"` in turn; medians of the summed times "
      f"over {r0['rounds']} rounds. Acceptance: drafts the main model accepted / drafts made.")
  lines = ["### Self-speculative decoding with the MTP layer", "", textwrap.fill(intro, 100), "",
           "| compute dtype | plain tokens/s | speculative tokens/s | speedup | acceptance | "
           "tokens per step | identical |", "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['dtype']} | {r['plain_tok_s']:.0f} | {r['spec_tok_s']:.0f} | "
            f"{r['speedup']:.2f}x | {r['acceptance']:.1%} | {r['tokens_per_step']:.2f} | "
            f"{'yes' if r['identical'] else 'NO'} |" for r in rows]
  costs = ("Per step (ms, batch 1, context 64): the main model's cached forward over one token "
           "(plain), over two (verification), and the latter plus the MTP layer over the two "
           "positions (a speculative step without its bookkeeping):")
  lines += ["", textwrap.fill(costs, 100), "",
            "| compute dtype | 1 token | 2 tokens | 2 tokens + MTP layer |", "|---|---|---|---|"]
  ratio = lambda r, k: f"{r[k]:.3f} ({r[k] / r['one_ms']:.2f}x)"
  lines += [f"| {r['dtype']} | {r['one_ms']:.3f} | {ratio(r, 'two_ms')} | "
            f"{ratio(r, 'two_mtp_ms')} |" for r in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="k2_small")
  parser.add_argument("--contexts", default="128,512,1024")
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md section")
  parser.add_argument("--mtp_workdir", help="a run trained with MTP layers: speculative decoding")
  parser.add_argument("--spec_prompts", type=int, default=8)
  parser.add_argument("--spec_tokens", type=int, default=256)
  parser.add_argument("--spec_rounds", type=int, default=3)
  parser.add_argument("--spec_dtypes", default="float32,bfloat16")
  parser.add_argument("--only_speculative", action="store_true")
  args = parser.parse_args()
  cfg = presets.get(args.preset)
  contexts = [int(c) for c in args.contexts.split(",")]
  results, text = {}, []
  if not args.only_speculative:
    rss = bench_load_rss()
    rows = bench_decode(cfg, contexts, args.steps, args.rounds)
    results.update(decode=rows, load_rss=rss)
    text.append(markdown(args.preset, cfg, rows, args.steps, rss))
  if args.mtp_workdir:
    spec = bench_speculative(args.mtp_workdir, args.spec_prompts, args.spec_tokens,
                             args.spec_rounds, args.spec_dtypes.split(","))
    results["speculative"] = spec
    text.append(speculative_markdown(args.mtp_workdir, spec))
  print("\n\n".join(text) if args.markdown else json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
