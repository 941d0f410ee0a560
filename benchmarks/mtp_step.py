"""Training cost of multi-token prediction: the train step of the k2_nano demo config
(experiments/configs/k2_nano.py: batch 16 x 256 byte tokens, bf16 compute, MuonClip) with one MTP
layer at lambda 0.3 (experiments/configs/k2_nano_mtp.py) against the same model without it.

Both steps are compiled first; each round times `--steps` steps of one, then of the other (the
machine is shared, so slow spells hit both); the table gives the medians over the rounds, of the
whole step and of the model's forward + backward alone.

Run: python benchmarks/mtp_step.py [--rounds 5] [--steps 5] [--markdown]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from k2jax.perf import time_fn
from k2jax.train import build_optimizer, init_state, losses, make_train_step, model_config
from k2jax.train.config import loss_weights
from k2jax.train.step import _forward

CONFIGS = pathlib.Path(__file__).parents[1] / "experiments" / "configs"


def _config(name: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _setup(name: str):
  config = _config(name)
  cfg = model_config(config, 257)  # the byte tokenizer's vocabulary.
  tx, schedule = build_optimizer(config, cfg)
  weights = loss_weights(config)
  step = make_train_step(cfg, tx, schedule, loss_weights=weights,
                         grad_clip=config.optimizer.grad_clip,
                         bias_update_rate=config.router.bias_update_rate)
  t = config.train
  batch = {"tokens": jax.random.randint(jax.random.key(0), (t.batch_size, t.seq_len + 1), 0, 257,
                                        jnp.int32)}
  state = init_state(cfg, tx, config.seed)
  step = step.lower(state, batch).compile()
  forward, terms = _forward(cfg), losses.for_model(weights, cfg)

  def loss(params, router, batch):  # the step's loss at step 0, alone.
    values = losses.term_values(weights, forward(params, router, batch), batch,
                                losses.counts(weights, batch, terms), terms)
    return losses.combine(weights, values, 0)

  grad = jax.jit(jax.grad(loss))
  return dict(cfg=cfg, step=step, state=state, batch=batch, grad=grad)


def _timed_steps(r: dict, n: int) -> float:
  start = time.perf_counter()
  for _ in range(n):
    r["state"], metrics = r["step"](r["state"], r["batch"])
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / n


def measure(rounds: int, steps: int) -> dict:
  runs = {"without": _setup("k2_nano"), "with": _setup("k2_nano_mtp")}
  for r in runs.values():
    _timed_steps(r, 2)
  times = {k: {"step": [], "grad": []} for k in runs}
  for _ in range(rounds):
    for k, r in runs.items():
      times[k]["step"].append(_timed_steps(r, steps))
      times[k]["grad"].append(time_fn(r["grad"], r["state"].params, r["state"].router,
                                      r["batch"], reps=steps))
  out = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
  out["ratio"] = {m: out["with"][m] / out["without"][m] for m in ("step", "grad")}
  return out


def markdown(r: dict, rounds: int, steps: int) -> str:
  ok = "met" if r["ratio"]["step"] <= 1.25 else "NOT met"
  return "\n".join([
      "### Training cost of the MTP layer (benchmarks/mtp_step.py)", "",
      f"`python benchmarks/mtp_step.py --rounds {rounds} --steps {steps} --markdown`: the k2_nano "
      "demo's train step (batch 16 x 256, bf16 compute, MuonClip)",
      "with one MTP layer at lambda 0.3 and without; medians over rounds that time both in turn.",
      "", "| | step ms | fwd+bwd ms |", "|---|---|---|",
      f"| without MTP | {r['without']['step'] * 1e3:.0f} | {r['without']['grad'] * 1e3:.0f} |",
      f"| one MTP layer, lambda 0.3 | {r['with']['step'] * 1e3:.0f} | "
      f"{r['with']['grad'] * 1e3:.0f} |",
      f"| ratio | {r['ratio']['step']:.2f}x | {r['ratio']['grad']:.2f}x |", "",
      f"Goal: step time with MTP <= 1.25x without: {ok} ({r['ratio']['step']:.2f}x)."])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md section")
  args = parser.parse_args()
  r = measure(args.rounds, args.steps)
  print(markdown(r, args.rounds, args.steps) if args.markdown else json.dumps(r, indent=2))


if __name__ == "__main__":
  main()
