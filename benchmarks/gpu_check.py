"""GPU check: the MoE dispatch paths agree, then k2_small's train-step MFU, MoE vs dense, decode.

  python benchmarks/gpu_check.py                 # on a GPU: measure, rewrite its RESULTS.md section
  python benchmarks/gpu_check.py --smoke --results=/tmp/r.md   # anywhere: tiny sizes, CPU ok

Needs only jax, flax, optax, orbax, einops and absl (no grain, no ml_collections), as on a bare
accelerator image. In order:
1. Agreement: one routed-expert layer's output and gradients (x, router weights, experts) by
   every dispatch path ("sort", "capacity" with room for every row, "ragged" =
   `jax.lax.ragged_dot`, and `tokamax.ragged_dot` in the ragged layout when tokamax is installed)
   against each token through its own K experts (`moe.gathered_experts`), in float32; and
   QK-Clip's max logits (the signed max pre-softmax logit per layer and head, collected by the
   model's one attention path) against the same model on the CPU.
2. The k2_small train step (MuonClip, bf16 compute): tokens/s and MFU = flops_per_token x
   tokens/s over the bf16 matmul peak measured in the same run (`k2jax.perf`).
3. MoE vs dense: one routed-expert layer's fwd+bwd per dispatch path against a dense SwiGLU of the
   same activated FLOPs (benchmarks/moe_dispatch.py's measurement).
4. Decode: `k2jax.decode.generate` tokens/s with the compressed MLA cache.
Without a GPU (and without --smoke) it stops with a one-line message.
"""

from __future__ import annotations

import importlib.util
import pathlib
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import moe_dispatch  # benchmarks/ (this script's directory)
import numpy as np
from absl import app, flags

from k2jax import optim, presets
from k2jax.decode import generate
from k2jax.flops import flops_per_token
from k2jax.model import Transformer, init_variables
from k2jax.model.dispatch import DISPATCHES, routed_experts
from k2jax.model.moe import gathered_experts
from k2jax.perf import matmul_peak_flops, time_fn
from k2jax.train.state import init_state
from k2jax.train.step import make_train_step

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes, any backend (the test suite's check).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Train step: sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Train step: tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Train step: timed steps (median).")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 16, "Decode: rows.")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "Decode: prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Decode: generated tokens per row.")
_RESULTS = flags.DEFINE_string("results", str(pathlib.Path(__file__).with_name("RESULTS.md")),
                               "Markdown file whose gpu_check section is rewritten.")

BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"


def _tokamax_ragged_dot():
  """tokamax.ragged_dot when tokamax is installed (same API as jax.lax.ragged_dot), else None."""
  if importlib.util.find_spec("tokamax") is None:
    return None
  import tokamax  # noqa: PLC0415 (optional)
  return tokamax.ragged_dot


def _ragged_with(rdot, x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD):
  """The ragged path's arithmetic with grouped matmul `rdot`: rows sorted by expert."""
  T, K = idx_TK.shape
  order_A = jnp.argsort(idx_TK.reshape(-1), stable=True)
  sizes_E = jnp.bincount(idx_TK.reshape(-1), length=wg_EDF.shape[0]).astype(jnp.int32)
  x_AD = x_TD[order_A // K]
  h_AF = jax.nn.silu(rdot(x_AD, wg_EDF, sizes_E)) * rdot(x_AD, wu_EDF, sizes_E)
  y_AD = jnp.zeros((T * K, x_TD.shape[1]), jnp.float32).at[order_A].set(rdot(h_AF, wd_EFD,
                                                                             sizes_E))
  return jnp.einsum("tkd,tk->td", y_AD.reshape(T, K, -1), w_TK)


def dispatch_agreement(tokens: int) -> dict[str, float]:
  """Max |path - reference| / max |reference| over the output and all gradients, per path."""
  shape = moe_dispatch.layer_shape()
  D, E, K, F = shape["D"], shape["E"], shape["K"], shape["F"]
  x_TD, idx_TK, w_TK, experts, _, dy_TD = moe_dispatch.inputs(tokens, D, E, K, F, skew=1.0)
  args = (x_TD, w_TK, *experts)

  def with_grads(fn):
    """The output and the gradients of sum(output * dy) wrt every input, in one program."""
    def both(*a):
      y_TD, vjp = jax.vjp(fn, *a)
      return [y_TD, *vjp(dy_TD)]
    return jax.jit(both)(*args)

  ref = with_grads(lambda x, w, g, u, d: gathered_experts(x, idx_TK, w, g, u, d, jnp.float32))
  paths = {d: (lambda x, w, g, u, d_, disp=d: routed_experts(
      x, idx_TK, w, g, u, d_, dispatch=disp, capacity_factor=float(E), dtype=jnp.float32)[0])
      for d in DISPATCHES}
  tokamax_rdot = _tokamax_ragged_dot()
  if tokamax_rdot is not None:
    rdot = lambda a, w, s: tokamax_rdot(a, w, s, preferred_element_type=jnp.float32)
    paths["tokamax.ragged_dot"] = lambda x, w, g, u, d: _ragged_with(rdot, x, idx_TK, w, g, u, d)
  out = {}
  for name, fn in paths.items():
    got = with_grads(fn)
    out[name] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in
                    zip(got, ref))
  return out


def model(preset: str, dtype: str):
  """The preset in `dtype`; "smoke" is k2_nano cut to two layers (one dense, one MoE)."""
  if preset == "smoke":
    return presets.get("k2_nano", num_hidden_layers=2, dtype=dtype)
  return presets.get(preset, dtype=dtype)


def max_logit_agreement(preset: str) -> float:
  """Relative difference of QK-Clip's max logits [L, H] (float32 model) between this backend's
  attention and the CPU's."""
  cfg = model(preset, "float32")
  variables = init_variables(cfg, 0)
  tokens_BT = jax.random.randint(jax.random.key(2), (4, 128), 0, cfg.vocab_size)
  forward = lambda v, t: Transformer(cfg).apply(v, t)[1]["max_logits"]
  here = np.asarray(jax.jit(forward)(variables, tokens_BT))
  cpu = jax.devices("cpu")[0]
  there = np.asarray(jax.jit(forward)(jax.device_put(variables, cpu),
                                      jax.device_put(tokens_BT, cpu)))
  return float(np.max(np.abs(here - there)) / np.max(np.abs(there)))


def train_mfu(preset: str, batch: int, seq_len: int, steps: int, peak_n: int = 8192) -> dict:
  cfg = model(preset, "bfloat16")
  tx = optim.muonclip(2e-4, model_config=cfg)
  step = make_train_step(cfg, tx, lambda s: 2e-4, grad_clip=1.0, bias_update_rate=1e-3)
  state = init_state(cfg, tx, 0)
  batch_ = {"tokens": jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0,
                                         cfg.vocab_size, jnp.int32)}
  state, _ = step(state, batch_)  # compile
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch_)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  seconds = float(np.median(times))
  peak = matmul_peak_flops(jnp.bfloat16, n=peak_n)
  tps = batch * seq_len / seconds
  return dict(preset=preset, batch=batch, seq_len=seq_len, step_s=seconds, tokens_per_s=tps,
              peak=peak, mfu=flops_per_token(cfg, seq_len) * tps / peak)


def decode_rate(preset: str, batch: int, prompt_len: int, new_tokens: int,
                dtype: str = "bfloat16") -> dict:
  cfg = model(preset, dtype)
  variables = init_variables(cfg, 0)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
  run = lambda: generate(cfg, variables, prompts, new_tokens)
  run()  # compile
  seconds = time_fn(lambda: run().tokens, reps=3)
  return dict(preset=preset, dtype=dtype, batch=batch, prompt_len=prompt_len,
              new_tokens=new_tokens, seconds=seconds, tokens_per_s=batch * new_tokens / seconds)


def markdown(device: str, agree: dict, max_logit_err: float, train: dict, moe: dict,
             decode: dict, smoke: bool) -> str:
  lines = ["## GPU check (benchmarks/gpu_check.py)", ""]
  if smoke:
    lines += ["SMOKE RUN (tiny sizes, not a measurement of any GPU).", ""]
  lines += [
      f"Device: {device}. Dispatch agreement (max relative error of the output and gradients "
      "against each token through its own experts, float32): "
      + ", ".join(f"{k} {v:.1e}" for k, v in agree.items())
      + f". QK-Clip's max logits (float32 model) against the CPU's: {max_logit_err:.1e}.", "",
      f"Train step ({train['preset']}, MuonClip, bf16, batch {train['batch']} x "
      f"{train['seq_len']}): {train['step_s'] * 1e3:.1f} ms, {train['tokens_per_s']:.0f} "
      f"tokens/s, MFU {train['mfu']:.1%} of the measured bf16 matmul peak "
      f"{train['peak'] / 1e12:.1f} TFLOP/s.", "",
      "MoE vs dense (one routed-expert layer's fwd+bwd over a dense SwiGLU of the same "
      f"activated FLOPs, {moe['tokens']} tokens, bf16): "
      + ", ".join(f"{k} {v:.2f}x" for k, v in moe["ratio"].items()) + ".", "",
      f"Decode ({decode['preset']}, {decode['dtype']}, {decode['batch']} rows, prompt "
      f"{decode['prompt_len']}, "
      f"{decode['new_tokens']} new tokens, prefill included): "
      f"{decode['tokens_per_s']:.0f} tokens/s.", ""]
  return "\n".join(lines)


def write_section(path: str, text: str) -> None:
  p = pathlib.Path(path)
  old = p.read_text() if p.exists() else ""
  block = f"{BEGIN}\n{text}{END}\n"
  if BEGIN in old:
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", lambda _: block, old,
                 flags=re.S)
  else:
    new = old + ("\n" if old else "") + block
  p.write_text(new)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  smoke = _SMOKE.value
  if jax.default_backend() != "gpu" and not smoke:
    sys.exit(f"error: no GPU (jax backend {jax.default_backend()!r}); --smoke runs tiny sizes")
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {platform.node()})"
  agree = dispatch_agreement(256 if smoke else 8192)
  max_logit_err = max_logit_agreement("smoke" if smoke else "k2_small")
  if smoke:
    train = train_mfu("smoke", 2, 32, 1, peak_n=256)
    moe = moe_dispatch.run(jnp.bfloat16, rounds=1, dispatches=("capacity",), tokens=256)
    decode = decode_rate("smoke", 2, 8, 4, "float32")  # XLA:CPU: no bf16 x bf16 -> f32 matvec
  else:
    train = train_mfu("k2_small", _BATCH.value, _SEQ.value, _STEPS.value)
    moe = moe_dispatch.run(jnp.bfloat16, rounds=5, tokens=16 * 1024)
    decode = decode_rate("k2_small", _DECODE_BATCH.value, _PROMPT.value, _NEW.value)
  text = markdown(device, agree, max_logit_err, train, moe, decode, smoke)
  print(text)
  write_section(_RESULTS.value, text)


if __name__ == "__main__":
  app.run(main)
