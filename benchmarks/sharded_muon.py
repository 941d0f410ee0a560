"""Collective traffic of MuonClip vs AdamW under sharding, read from the compiled HLO.

On 8 simulated CPU devices, the k2_small train step (forward, backward, optimizer update, router
bias) is compiled for each optimizer on two meshes: FSDP (fsdp=8) and expert parallelism
(expert=8, the batch split over experts' devices too). Nothing runs; every collective of the
partitioned HLO is counted with the trip counts of the loops around it, and converted to bytes
received per device with ring costs (`k2jax.hlo.collective_bytes`). The optimizer update alone
(`tx.update` + `apply_updates` on sharded grads, params and state) is counted too: what
Distributed Muon adds.
Goal: MuonClip's train step moves at most 1.25x AdamW's (Moonlight's bound for Distributed Muon).

Run: python benchmarks/sharded_muon.py [--preset k2_small] [--layers N] [--markdown]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from k2jax import optim, presets, sharding  # noqa: E402
from k2jax.hlo import collective_bytes  # noqa: E402
from k2jax.model import partitioning  # noqa: E402
from k2jax.train.state import init_state  # noqa: E402
from k2jax.train.step import make_train_step  # noqa: E402

LAYOUTS = {"FSDP (fsdp=8)": {"fsdp": 8}, "expert parallel (expert=8)": {"expert": 8}}


def _compile(fn, args, in_shardings, out_shardings, mesh) -> str:
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)
    return jitted.lower(*args).compile().as_text()


def measure(cfg, layout: dict[str, int], opt_name: str, batch: int, seq: int) -> dict:
  mesh = sharding.make_mesh(layout)
  param_sh = partitioning.variable_shardings(cfg, mesh)["params"]
  tx = (optim.muonclip(2e-4, model_config=cfg, param_shardings=param_sh) if opt_name == "muonclip"
        else optim.adamw(2e-4))
  state = jax.eval_shape(lambda: init_state(cfg, tx, 0))
  state_sh = sharding.tree_shardings(state, state.params, param_sh, mesh)
  step = make_train_step(cfg, tx, lambda s: 2e-4, grad_clip=1.0, bias_update_rate=1e-3)
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  t0 = time.perf_counter()
  step_hlo = _compile(step.__wrapped__, (state, {"tokens": tokens}),
                      (state_sh, sharding.batch_sharding(mesh)), (state_sh, None), mesh)

  def update(grads, opt_state, params, max_logits):
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)
    return optax.apply_updates(params, updates), opt_state

  max_logits = jax.ShapeDtypeStruct((cfg.num_hidden_layers, cfg.num_attention_heads), jnp.float32)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_sh = state_sh.opt_state
  update_hlo = _compile(update, (state.params, state.opt_state, state.params, max_logits),
                        (param_sh, opt_sh, param_sh, replicated), (param_sh, opt_sh), mesh)
  n = mesh.size
  return {"step": collective_bytes(step_hlo, n), "update": collective_bytes(update_hlo, n),
          "compile_s": time.perf_counter() - t0,
          "param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="k2_small")
  parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers override")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--markdown", action="store_true")
  args = parser.parse_args()
  overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
  cfg = presets.get(args.preset, **overrides)
  mb = lambda b: f"{b / 2**20:.1f}"
  rows = []
  for layout_name, layout in LAYOUTS.items():
    res = {o: measure(cfg, layout, o, args.batch, args.seq) for o in ("adamw", "muonclip")}
    steps = {o: sum(r["step"].values()) for o, r in res.items()}
    updates = {o: sum(r["update"].values()) for o, r in res.items()}
    for o, r in res.items():
      kinds = ", ".join(f"{k} {mb(v)}" for k, v in sorted(r["step"].items()) if v)
      rows.append((layout_name, o, mb(steps[o]), mb(updates[o]),
                   f"{steps[o] / steps['adamw']:.3f}x", kinds))
      print(f"{layout_name}, {o}: compiled in {r['compile_s']:.0f}s", flush=True)
  print(f"{args.preset}: {cfg.num_hidden_layers} layers, "
        f"{res['adamw']['param_bytes'] / 2**20:.0f} MiB of float32 params, "
        f"batch {args.batch} x {args.seq}, 8 simulated CPU devices")
  header = ("layout", "optimizer", "train step (MiB/device)", "update alone (MiB/device)",
            "step vs AdamW", "step by kind (MiB)")
  if args.markdown:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
      print("| " + " | ".join(r) + " |")
  else:
    for r in rows:
      print("  ".join(f"{c}" for c in r))


if __name__ == "__main__":
  main()
