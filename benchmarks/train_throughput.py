"""Training throughput of k2_small here: tokens/s, MFU, and the cost of async checkpoints.

  python benchmarks/train_throughput.py [--steps=4] [--batch_size=4] [--seq_len=512]

MFU = flops_per_token * tokens/s / peak, the peak being an [n, n] matmul in the compute dtype
(accumulating in float32) measured in this run. The checkpoint ratio is the wall time of a run
that saves an async orbax checkpoint every `--ckpt_every` steps over the same run without;
chunks of `--ckpt_every` steps with and without a save alternate, so a drifting machine load
hits both alike (each saving chunk waits for its write: an upper bound).
Appends (or replaces) its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import pathlib
import platform
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from k2jax import optim, presets
from k2jax.flops import flops_per_token
from k2jax.model import Transformer
from k2jax.model.counting import count_params
from k2jax.perf import matmul_peak_flops, time_fn
from k2jax.train import init_state, losses, make_train_step
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.schedules import make_schedule

_PRESET = flags.DEFINE_string("preset", "k2_small", "Model preset.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes to measure.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps (after two warm-up steps).")
_CKPT_EVERY = flags.DEFINE_integer("ckpt_every", 10, "Checkpoint interval of the overhead run.")
_CKPT_REPEATS = flags.DEFINE_integer("ckpt_repeats", 2,
                                     "Alternating (plain, saving) chunks; 0 skips it.")
_RESULTS = flags.DEFINE_string("results", str(pathlib.Path(__file__).with_name("RESULTS.md")),
                               "Markdown file whose train_throughput section is rewritten.")

BEGIN, END = "<!-- train_throughput:begin -->", "<!-- train_throughput:end -->"


def _setup(dtype: str):
  cfg = presets.get(_PRESET.value, dtype=dtype)
  sched = make_schedule("wsd", 2e-4, 1000, 10)
  tx = optim.muonclip(sched, model_config=cfg)
  step = make_train_step(cfg, tx, sched, grad_clip=1.0, bias_update_rate=1e-3)
  tokens = jax.random.randint(jax.random.key(0), (_BATCH.value, _SEQ.value + 1), 0,
                              cfg.vocab_size, jnp.int32)
  return cfg, tx, step, {"tokens": tokens}


def _timed_chunk(step, state, batch, n: int, ckpt: Checkpointer | None, save_step: int):
  """Wall time of n steps dispatched as the loop does (metrics read one step late), then,
  with `ckpt`, an async save of the state (waited for)."""
  pending = None
  start = time.perf_counter()
  for _ in range(n):
    state, metrics = step(state, batch)
    if pending is not None:
      jax.device_get(pending)
    pending = metrics
  jax.device_get(pending)
  if ckpt is not None:
    ckpt.save(save_step, state, {"step": save_step})
    ckpt.wait()
  return time.perf_counter() - start, state


def measure(dtype: str) -> dict:
  cfg, tx, step, batch = _setup(dtype)
  state = init_state(cfg, tx, 0)
  t0 = time.perf_counter()
  step = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  model = Transformer(cfg)

  def loss(params, router, batch):
    logits_BTV, aux = model.apply({"params": params, "router": router},
                                  **losses.model_inputs(batch))
    out = {"logits": logits_BTV, "aux": aux}
    return losses.TERMS["cross_entropy"].total(out, batch) / batch["tokens"][:, 1:].size

  grad_s = time_fn(jax.jit(jax.grad(loss)), state.params, state.router, batch, reps=3)
  peak = matmul_peak_flops(jnp.dtype(dtype))
  tps = _BATCH.value * _SEQ.value / step_s
  fpt = flops_per_token(cfg, _SEQ.value)
  return dict(cfg=cfg, state=state, step=step, batch=batch, compile_s=compile_s, step_s=step_s,
              grad_s=grad_s, tps=tps, peak=peak, mfu=fpt * tps / peak, fpt=fpt)


def checkpoint_ratio(r: dict) -> tuple[float, float]:
  """(seconds without saves, seconds with a save every ckpt_every steps), chunks alternating."""
  every, state = _CKPT_EVERY.value, r["state"]
  plain = saving = 0.0
  with tempfile.TemporaryDirectory() as d:
    ckpt = Checkpointer(pathlib.Path(d) / "checkpoints", keep=2)
    ckpt.save(0, state, {"step": 0})  # warm-up: compiles the finiteness check, starts orbax.
    ckpt.wait()
    for i in range(1, _CKPT_REPEATS.value + 1):
      seconds, state = _timed_chunk(r["step"], state, r["batch"], every, None, 0)
      plain += seconds
      seconds, state = _timed_chunk(r["step"], state, r["batch"], every, ckpt, i)
      saving += seconds
    ckpt.close()
  return plain, saving


def write_section(text: str) -> None:
  path = pathlib.Path(_RESULTS.value)
  old = path.read_text() if path.exists() else "# Benchmarks\n"
  section = f"{BEGIN}\n{text.strip()}\n{END}"
  if BEGIN in old:
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, old, flags=re.S)
  else:
    new = old.rstrip("\n") + "\n\n" + section + "\n"
  path.write_text(new)


def main(argv):
  del argv
  rows, results = [], {}
  for dtype in _DTYPES.value:
    r = results[dtype] = measure(dtype)
    rows.append(f"| {dtype} | {r['step_s'] * 1e3:.0f} | {r['grad_s'] * 1e3:.0f} | "
                f"{r['tps']:,.0f} | {r['peak'] / 1e12:.2f} | {r['mfu']:.1%} | "
                f"{r['compile_s']:.0f} |")
    print(rows[-1], flush=True)
  best = results[_DTYPES.value[0]]
  every, reps = _CKPT_EVERY.value, _CKPT_REPEATS.value
  if reps:
    plain, saving = checkpoint_ratio(best)
    ratio = saving / plain
    ckpt = (f"Async checkpoint every {every} steps ({reps} x {every} steps each way, "
            f"{_DTYPES.value[0]}):\n{saving:.1f}s vs {plain:.1f}s without, ratio {ratio:.3f} "
            f"(goal <= 1.05:\n{'met' if ratio <= 1.05 else 'not met'}).")
  else:
    ckpt = "Async checkpoint overhead: not measured in this run (--ckpt_repeats=0)."
  print(ckpt, flush=True)
  cfg = best["cfg"]
  counts = count_params(cfg)
  bf16 = results.get("bfloat16")
  goal = ("Goal MFU >= 30% of the bf16 peak: "
          + (f"{'met' if bf16['mfu'] >= 0.3 else 'not met'} ({bf16['mfu']:.1%})" if bf16
             else "bf16 not measured"))
  text = f"""
## Training throughput (`benchmarks/train_throughput.py`)

{_PRESET.value} ({counts['total'] / 1e6:.0f}M params, {counts['activated'] / 1e6:.0f}M activated),
MuonClip train step, batch {_BATCH.value} x {_SEQ.value} tokens, {jax.device_count()} device(s),
{platform.processor() or platform.machine()}, jax {jax.__version__}.
flops_per_token = {best['fpt'] / 1e6:.0f} MFLOP (6 x activated matmul params + causal attention).
Peak: a 2048x2048 matmul in the same dtype accumulating in float32, measured in this run.
The rest of a step beyond the model's fwd+bwd is mostly the optimizer (Newton-Schulz on every
expert matrix).

| compute dtype | step ms | of which fwd+bwd ms | tokens/s | peak TFLOP/s | MFU | compile s |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{goal}
{ckpt}
"""
  write_section(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
