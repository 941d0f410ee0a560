"""MoE dispatch benchmark: fwd+bwd of one routed-expert layer vs an equal-FLOP dense SwiGLU.

The layer has k2_small's shape (D, E, K, F); T = 8 * 512 tokens routed by top-K of random
logits ("balanced": every expert near T*K/E rows) or with expert 0's logit raised so that it
takes most tokens ("skewed": the dropless sort path then leaves its capacity layout for the
block layout). The dense reference is one SwiGLU of width K*F applied to every token: the same
activated FLOPs, timed two ways: `layers.swiglu` (the routed paths' numerics: bf16 matmuls in
the backward too) and plain autodiff of `layers.matmul` (the backward's matmuls then run in
float32). Ratios are to the faster of the two in the same round: each round times every variant
back to back (the machine is shared), and the table gives medians over rounds.

"ragged" is left out on CPU by default: XLA:CPU computes `ragged_dot` densely (E x the FLOPs).

Also the whole k2_small model's forward at batch 8 x 512: tokens/s and MFU, i.e. forward FLOPs
(`flops_per_token / 3`) per second over the matmul peak measured in the same run and dtype.

Run: python benchmarks/moe_dispatch.py [--rounds N] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp

from k2jax import presets
from k2jax.flops import flops_per_token
from k2jax.model import Transformer, init_variables
from k2jax.model.dispatch import DISPATCHES, routed_experts
from k2jax.model.layers import matmul, swiglu
from k2jax.perf import matmul_peak_flops, time_fn

TOKENS = 8 * 512
SKEW = 3.0  # added to expert 0's logit in the skewed routing


def layer_shape() -> dict:
  cfg = presets.get("k2_small")
  return dict(D=cfg.hidden_size, E=cfg.n_routed_experts, K=cfg.num_experts_per_tok,
              F=cfg.moe_intermediate_size, block_size=cfg.moe_block_size,
              capacity_factor=cfg.capacity_factor)


def default_dispatches() -> tuple[str, ...]:
  return tuple(d for d in DISPATCHES if d != "ragged" or jax.default_backend() != "cpu")


def inputs(T, D, E, K, F, skew, seed=0):
  ks = jax.random.split(jax.random.key(seed), 9)
  x_TD = jax.random.normal(ks[0], (T, D), jnp.float32)
  logits_TE = jax.random.normal(ks[1], (T, E)).at[:, 0].add(skew)
  w_TK, idx_TK = jax.lax.top_k(jax.nn.sigmoid(logits_TE), K)
  w_TK = w_TK / jnp.sum(w_TK, axis=-1, keepdims=True)
  experts = (jax.random.normal(ks[2], (E, D, F)) * D**-0.5,
             jax.random.normal(ks[3], (E, D, F)) * D**-0.5,
             jax.random.normal(ks[4], (E, F, D)) * F**-0.5)
  dense = (jax.random.normal(ks[5], (D, K * F)) * D**-0.5,
           jax.random.normal(ks[6], (D, K * F)) * D**-0.5,
           jax.random.normal(ks[7], (K * F, D)) * (K * F)**-0.5)
  dy_TD = jax.random.normal(ks[8], (T, D), jnp.float32)
  return x_TD, idx_TK, w_TK, experts, dense, dy_TD


def _dense_steps(dtype):
  def swiglu_loss(x_TD, wg_DF, wu_DF, wd_FD, dy_TD):
    return jnp.sum(swiglu(x_TD, wg_DF, wu_DF, wd_FD, dtype) * dy_TD)

  def autodiff_loss(x_TD, wg_DF, wu_DF, wd_FD, dy_TD):
    h_TF = (jax.nn.silu(matmul("td,df->tf", x_TD, wg_DF, dtype))
            * matmul("td,df->tf", x_TD, wu_DF, dtype))
    return jnp.sum(matmul("tf,fd->td", h_TF, wd_FD, dtype) * dy_TD)
  return {name: jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
          for name, loss in (("dense", swiglu_loss), ("dense_autodiff", autodiff_loss))}


def _moe_step(dispatch, dtype, block_size, capacity_factor):
  def loss(x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD, idx_TK, dy_TD):
    y_TD, _ = routed_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, dispatch=dispatch,
                             capacity_factor=capacity_factor, block_size=block_size, dtype=dtype)
    return jnp.sum(y_TD * dy_TD)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def run(dtype=jnp.bfloat16, rounds: int = 5, dispatches=None, tokens: int = TOKENS) -> dict:
  """Median fwd+bwd seconds of the dense references and each dispatch (balanced routing, and
  skewed for "sort"), with median per-round ratios to the faster dense."""
  dispatches = default_dispatches() if dispatches is None else dispatches
  shape = layer_shape()
  D, E, K, F = shape["D"], shape["E"], shape["K"], shape["F"]
  x_TD, idx_TK, w_TK, experts, dense, dy_TD = inputs(tokens, D, E, K, F, skew=0.0)
  steps = {name: (fn, (x_TD, *dense, dy_TD)) for name, fn in _dense_steps(dtype).items()}
  moe = {d: _moe_step(d, dtype, shape["block_size"], shape["capacity_factor"])
         for d in dispatches}
  for d, fn in moe.items():
    steps[d] = (fn, (x_TD, w_TK, *experts, idx_TK, dy_TD))
  loads = {"balanced": jnp.bincount(idx_TK.reshape(-1), length=E)}
  if "sort" in moe:
    x_TD, idx_TK, w_TK, experts, _, dy_TD = inputs(tokens, D, E, K, F, skew=SKEW)
    steps["sort (skewed)"] = (moe["sort"], (x_TD, w_TK, *experts, idx_TK, dy_TD))
    loads["skewed"] = jnp.bincount(idx_TK.reshape(-1), length=E)
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, (fn, args) in steps.items():
      times[name].append(time_fn(fn, *args, reps=1))
  best_dense = [min(a, b) for a, b in zip(times["dense"], times["dense_autodiff"])]
  return dict(
      shape=shape, tokens=tokens, dtype=jnp.dtype(dtype).name, rounds=rounds,
      flops=3 * 2 * 3 * tokens * D * K * F,  # fwd + bwd of three [T, D] @ [D, K*F] matmuls
      median_s={n: statistics.median(t) for n, t in times.items()},
      ratio={n: statistics.median(t / b for t, b in zip(ts, best_dense))
             for n, ts in times.items()},
      max_load_over_mean={k: float(v.max() / v.mean()) for k, v in loads.items()},
      peak=matmul_peak_flops(dtype), loadavg=os.getloadavg()[0])


def model_forward(dtype, rounds: int = 3, batch: int = 8, seq_len: int = 512) -> dict:
  """k2_small forward tokens/s and MFU against the matmul peak, both measured here."""
  cfg = presets.get("k2_small", dtype=jnp.dtype(dtype).name)
  variables = init_variables(cfg, 0)
  tokens_BT = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, cfg.vocab_size)
  forward = jax.jit(lambda v, t: Transformer(cfg).apply(v, t)[0])
  seconds = time_fn(forward, variables, tokens_BT, reps=rounds)
  peak = matmul_peak_flops(dtype)
  tps = batch * seq_len / seconds
  return dict(dtype=jnp.dtype(dtype).name, tokens_per_s=tps, peak=peak,
              mfu=flops_per_token(cfg, seq_len) / 3 * tps / peak)


def markdown(results: list[dict], forwards: list[dict]) -> str:
  s, r0 = results[0]["shape"], results[0]
  loads = ", ".join(f"{k} {v:.2f}" for k, v in r0["max_load_over_mean"].items())
  lines = [
      "## MoE dispatch (benchmarks/moe_dispatch.py)", "",
      f"Forward+backward (grads wrt x, router weights and expert weights) of one routed-expert "
      f"layer, k2_small shape D={s['D']} E={s['E']} K={s['K']} F={s['F']}, T={r0['tokens']} "
      f"tokens, moe_block_size={s['block_size']}, capacity_factor={s['capacity_factor']}; "
      f"max expert load / mean: {loads}. Reference: a dense SwiGLU of width K*F on every token "
      "(same activated FLOPs): `dense` = `layers.swiglu` (bf16 matmuls forward and backward), "
      "`dense_autodiff` = autodiff of `layers.matmul` (float32 backward matmuls). Ratio = median "
      "over rounds of (time / faster dense time in the same round). TFLOP/s counts activated "
      "FLOPs only.", ""]
  for r in results:
    lines.append(f"{r['dtype']} compute, {r['rounds']} rounds, matmul peak "
                 f"{r['peak'] / 1e12:.2f} TFLOP/s (measured in the same run), 1-min load "
                 f"average {r['loadavg']:.1f} on this shared machine:")
    lines += ["", "| path | fwd+bwd ms | ratio to dense | TFLOP/s |", "|---|---|---|---|"]
    lines += [f"| {n} | {t * 1e3:.1f} | {r['ratio'][n]:.2f} | {r['flops'] / t / 1e12:.3f} |"
              for n, t in r["median_s"].items()]
    lines.append("")
  lines += ["k2_small forward, batch 8 x 512 (MFU = forward FLOPs/s over the matmul peak of the "
            "same run and dtype):", "", "| dtype | tokens/s | peak TFLOP/s | MFU |",
            "|---|---|---|---|"]
  lines += [f"| {f['dtype']} | {f['tokens_per_s']:.0f} | {f['peak'] / 1e12:.2f} | "
            f"{f['mfu']:.1%} |" for f in forwards]
  return "\n".join(lines + [""])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--dispatches", default=",".join(default_dispatches()))
  parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
  args = parser.parse_args()
  results = [run(jnp.dtype(d), args.rounds, tuple(args.dispatches.split(",")))
             for d in args.dtypes.split(",")]
  forwards = [model_forward(jnp.dtype(d)) for d in args.dtypes.split(",")]
  for r in results:
    print(f"{r['dtype']}: " + "  ".join(f"{n} {t * 1e3:.1f} ms ({r['ratio'][n]:.2f}x)"
                                        for n, t in r["median_s"].items()))
  for f in forwards:
    print(f"k2_small forward {f['dtype']}: {f['tokens_per_s']:.0f} tokens/s, MFU {f['mfu']:.1%}")
  if args.markdown:
    print(markdown(results, forwards))


if __name__ == "__main__":
  main()
