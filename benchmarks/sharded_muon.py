"""Collective traffic of MuonClip vs AdamW under sharding, read from the compiled HLO.

On 8 simulated CPU devices, the k2_small train step (forward, backward, optimizer update, router
bias) is compiled for each optimizer on two meshes: FSDP (fsdp=8) and expert parallelism
(expert=8, the batch split over experts' devices too). Nothing runs; every collective of the
partitioned HLO is counted with the trip counts of the loops around it, and converted to bytes
received per device with the ring costs: all-gather and all-to-all move (n-1)/n of their result,
reduce-scatter (n-1) times its result, all-reduce 2(n-1)/n of it, collective-permute all of it
(n devices in the group). The optimizer update alone (`tx.update` + `apply_updates` on sharded
grads, params and state) is counted too: what Distributed Muon adds.
Goal: MuonClip's train step moves at most 1.25x AdamW's (Moonlight's bound for Distributed Muon).

Run: python benchmarks/sharded_muon.py [--preset k2_small] [--layers N] [--markdown]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from k2jax import optim, presets, sharding  # noqa: E402
from k2jax.model import partitioning  # noqa: E402
from k2jax.train.state import init_state  # noqa: E402
from k2jax.train.step import make_train_step  # noqa: E402

LAYOUTS = {"FSDP (fsdp=8)": {"fsdp": 8}, "expert parallel (expert=8)": {"expert": 8}}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8, "s64": 8, "u64": 8}
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_OP = re.compile(r"= (.+?) (" + "|".join(KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_WHILE = re.compile(r" while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-, %]+)\}?")


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))]))
  return num_devices


def _bytes(shape_text: str) -> int:
  return sum(_DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dt, dims in _SHAPE.findall(shape_text))


def _moved(kind: str, result_bytes: int, n: int) -> float:
  if n <= 1:
    return 0.0
  return {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n, "reduce-scatter": n - 1,
          "all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}[kind] * result_bytes


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
  """Bytes received per device by each kind of collective of a partitioned HLO module."""
  own: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
  calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
  comp, entry = None, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      comp = m.group(1)
      if line.startswith("ENTRY"):
        entry = comp
      continue
    if comp is None or "=" not in line:
      continue
    op = _OP.search(line)
    if op and f"{op.group(2)}-done" not in line:
      own[comp][op.group(2)] += _moved(op.group(2), _bytes(op.group(1)),
                                       _group_size(line, num_devices))
    w = _WHILE.search(line)
    if w:
      trip = _TRIP.search(line)
      n = int(trip.group(1)) if trip else 1
      calls[comp] += [(w.group(1), n + 1), (w.group(2), n)]
      continue
    for c in _CALLS.finditer(line):
      calls[comp] += [(name.strip().lstrip("%"), 1) for name in c.group(1).split(",")]

  def total(name: str, seen=()) -> dict[str, float]:
    out = defaultdict(float, own.get(name, {}))
    for callee, times in calls.get(name, []):
      if callee in seen:
        continue
      for k, v in total(callee, seen + (name,)).items():
        out[k] += times * v
    return out

  return dict(total(entry))


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
