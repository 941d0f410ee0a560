"""XLA:CPU's fusion emitters: compile cost against run time, for the test suite's compile flags.

tests/conftest.py compiles with `--xla_cpu_use_fusion_emitters=false` (XLA:CPU's classic fusion
emitters instead of its MLIR ones) because the suite compiles hundreds of small programs and
runs each briefly. This measures what that buys and costs on one k2_nano MuonClip train step
(float32, batch 8 x 128): the CPU seconds to compile it, and the wall time of 20 steps. Both
settings use the suite's other flags (LLVM -O0 without expensive passes). Each setting runs in
its own process (XLA reads its flags once), alternating, ROUNDS times; the table gives medians.

Run: python benchmarks/compile_flags.py [--rounds N] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SUITE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SETTINGS = {"MLIR fusion emitters (XLA's default)": SUITE,
            "classic fusion emitters (the suite's)": SUITE + " --xla_cpu_use_fusion_emitters=false"}
STEPS = 20


def child() -> None:
  """Compiles and times the train step; prints {"compile_cpu_s", "steps_s"} as JSON."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np

  from k2jax import optim, presets
  from k2jax.train import init_state, make_train_step
  from k2jax.train.schedules import make_schedule

  cfg = presets.get("k2_nano", dtype="float32")
  sched = make_schedule("constant", 1e-3, 100, 0)
  tx = optim.muonclip(sched, model_config=cfg)
  step = make_train_step(cfg, tx, sched, loss_weights={"cross_entropy": 1.0})
  state = init_state(cfg, tx, seed=0)
  batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 129)),
                                 jnp.int32)}
  lowered = step.lower(state, batch)
  t0 = time.process_time()
  compiled = lowered.compile()
  compile_cpu_s = time.process_time() - t0
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(STEPS):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  print(json.dumps({"compile_cpu_s": compile_cpu_s, "steps_s": time.perf_counter() - t0}))


def measure(flags: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cached executable would skip the compile.
  out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--markdown", action="store_true")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child()
  runs = {name: [] for name in SETTINGS}
  for r in range(args.rounds):
    for name, flags in SETTINGS.items():
      runs[name].append(measure(flags))
      print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
  med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
  base, ours = (med[name] for name in SETTINGS)
  rows = [f"| {name} | {m['compile_cpu_s']:.2f} | {m['steps_s']:.2f} |" for name, m in med.items()]
  print("\n".join([
    "## XLA:CPU fusion emitters: compile against run time (benchmarks/compile_flags.py)", "",
    f"One k2_nano MuonClip train step (float32, batch 8 x 128), LLVM -O0 as in the test suite; "
    f"medians of {args.rounds} rounds, each setting in its own process, alternating.", "",
    f"| setting | compile (CPU s) | {STEPS} steps (wall s) |", "|---|---|---|", *rows, "",
    f"The classic emitters compile in {ours['compile_cpu_s'] / base['compile_cpu_s']:.2f}x the "
    f"CPU time and run {STEPS} steps in {ours['steps_s'] / base['steps_s']:.2f}x the wall time: "
    "the trade the test suite takes (hundreds of programs, each run briefly); demos and "
    "benchmarks keep XLA's defaults."]))


if __name__ == "__main__":
  main()
