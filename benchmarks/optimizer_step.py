"""Optimizer-step benchmark: one update of the full k2_small tree, MuonClip vs optax's Muon/AdamW.

Times (jitted update + apply_updates, same grads, params and role split):
  muonclip           k2jax.muonclip (Newton-Schulz in bfloat16 with float32 accumulation),
                     with max_logits that clip about half the heads;
  muonclip ns=f32    the same with Newton-Schulz in float32;
  optax.contrib.muon consistent_rms=0.2, the same dimension numbers (last two axes; Muon on
                     the same leaves), beta 0.95, Nesterov, wd 0.1, AdamW betas (0.9, 0.95);
  optax.adamw        on every leaf.
Each round times all of them back to back (the machine is shared); the table gives medians.
Also: the muonclip update as a fraction of the model's forward+backward step at batch 8 x
seq 512, and the Newton-Schulz FLOPs of one update against the measured bf16 matmul peak, run as
on this backend (on CPU: `lax.map` batches of `CPU_NS_BATCH` matrices) and, alternating with it
in every round, as one batch per matrix shape (what accelerators run).

Run: python benchmarks/optimizer_step.py [--rounds N] [--preset k2_small] [--markdown]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import k2jax.optim as ko
from k2jax import presets
from k2jax.model import Transformer, init_variables
from k2jax.optim.muon import orthogonalize_batched
from k2jax.perf import matmul_peak_flops, time_fn

LR = 2e-4


def optax_muon(params):
  """optax.contrib.muon configured like k2jax.muon: Muon on the same leaves, RMS matching."""
  roles = ko.param_roles(params)
  matrix = optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
  dims = jax.tree.map(lambda r: matrix if r == "muon" else None, roles)
  return optax.contrib.muon(LR, beta=0.95, nesterov=True, weight_decay=0.1, adam_b1=0.9,
                            adam_b2=0.95, adam_weight_decay=0.1, consistent_rms=0.2,
                            muon_weight_dimension_numbers=dims)


def _step(tx, needs_max_logits):
  def step(grads, state, params, max_logits):
    extra = {"max_logits": max_logits} if needs_max_logits else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def _fwd_bwd(cfg, variables, batch, seq):
  tokens = jax.random.randint(jax.random.key(3), (batch, seq + 1), 0, cfg.vocab_size)

  def loss(params):
    logits, aux = Transformer(cfg).apply({**variables, "params": params}, tokens[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)
    return jnp.mean(nll), aux

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def run(preset: str = "k2_small", rounds: int = 3, batch: int = 8, seq: int = 512) -> dict:
  cfg = presets.get(preset)
  variables = init_variables(cfg, jax.random.key(0))
  params = variables["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) * 1e-3
                                       for k, x in zip(keys, leaves)])
  rng = np.random.default_rng(2)
  max_logits = jnp.asarray(rng.uniform(50, 150, (cfg.num_hidden_layers,
                                                 cfg.num_attention_heads)), jnp.float32)
  optimizers = {
    "muonclip": (ko.muonclip(LR, model_config=cfg), True),
    "muonclip ns=f32": (ko.muonclip(LR, model_config=cfg, ns_dtype=jnp.float32), True),
    "optax.contrib.muon": (optax_muon(params), False),
    "optax.adamw": (optax.adamw(LR, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1), False),
  }
  steps = {name: (_step(tx, clip), tx.init(params)) for name, (tx, clip) in optimizers.items()}
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, (step, state) in steps.items():
      times[name].append(time_fn(step, grads, state, params, max_logits, reps=3))
  result = {name: statistics.median(t) for name, t in times.items()}

  fwd_bwd = _fwd_bwd(cfg, variables, batch, seq)
  result["fwd_bwd"] = time_fn(fwd_bwd, params, reps=2)

  roles = jax.tree.leaves(ko.param_roles(params))
  muon_leaves = [g for g, r in zip(jax.tree.leaves(grads), roles) if r == "muon"]
  ns = {name: jax.jit(functools.partial(orthogonalize_batched, batch_size=size,
                                         dtype=jnp.bfloat16))
        for name, size in (("ns_time", None), ("ns_time_one_batch", 1 << 30))}
  ns_times = {name: [] for name in ns}
  for _ in range(rounds):
    for name, fn in ns.items():
      ns_times[name].append(time_fn(fn, muon_leaves, reps=3))
  result.update({name: statistics.median(t) for name, t in ns_times.items()})
  result["ns_flops"] = sum(ko.newton_schulz_flops(g.shape) for g in muon_leaves)
  result["peak_bf16"] = matmul_peak_flops(jnp.bfloat16)
  result["params"] = sum(x.size for x in leaves)
  result["muon_params"] = sum(g.size for g in muon_leaves)
  return result


def markdown(r: dict, preset: str, batch: int, seq: int) -> str:
  base = r["optax.contrib.muon"]
  lines = [
    f"## Optimizer step ({preset}, {r['params'] / 1e6:.1f}M params, "
    f"{r['muon_params'] / 1e6:.1f}M on Muon; {os.cpu_count()} CPU cores, shared)",
    "",
    "| optimizer | update + apply (ms) | vs optax.contrib.muon |",
    "|---|---|---|",
  ]
  for name in ("muonclip", "muonclip ns=f32", "optax.contrib.muon", "optax.adamw"):
    lines.append(f"| {name} | {r[name] * 1e3:.0f} | {r[name] / base:.2f}x |")
  ns_rate = r["ns_flops"] / r["ns_time"]
  lines += [
    "",
    f"- forward+backward at batch {batch} x seq {seq}: {r['fwd_bwd'] * 1e3:.0f} ms; the muonclip "
    f"update is {r['muonclip'] / r['fwd_bwd']:.1%} of it.",
    f"- Newton-Schulz (bf16 inputs, f32 accumulation, 5 steps) per update: "
    f"{r['ns_flops'] / 1e9:.1f} GFLOP in {r['ns_time'] * 1e3:.0f} ms = "
    f"{ns_rate / 1e12:.3f} TFLOP/s, {ns_rate / r['peak_bf16']:.0%} of the measured bf16 matmul "
    f"peak ({r['peak_bf16'] / 1e12:.3f} TFLOP/s). As one batch per matrix shape: "
    f"{r['ns_time_one_batch'] * 1e3:.0f} ms ({r['ns_time_one_batch'] / r['ns_time']:.2f}x).",
  ]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="k2_small")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md section")
  args = parser.parse_args()
  r = run(args.preset, args.rounds, args.batch, args.seq)
  if args.markdown:
    print(markdown(r, args.preset, args.batch, args.seq))
  else:
    for k, v in r.items():
      print(f"{k}: {v:.6g}")


if __name__ == "__main__":
  main()
