"""Ahead-of-time compilation for TPU slices on any host: does a config fit, how fast might it be.

With libtpu installed, `jax.experimental.topologies.get_topology_desc` gives compile-only devices
of any TPU slice, and compiling for a mesh of them runs the real XLA TPU compiler here. Nothing is
ever allocated: the train state, the batch and the serving cache are ShapeDtypeStructs.

`topology(name)` -> (devices, chip); `topology_mesh(mesh_cfg, devices)` -> the k2jax mesh;
`compile_report(...)` of any jitted program, `prefill_report(...)`, `decode_report(...)` and
(in k2jax.train.aot, above the train step) `train_step_report(...)` -> a `Report` per chip:
memory against HBM (or "does not fit" with the compiler's reason), compiled FLOPs against the
FLOP model, collective bytes by kind, and a step-time estimate.

Every time here is an estimate, never a measurement. The compiler's own (`optimal_seconds`) is
reported as it comes, but it counts a loop body once and is sometimes negative, so the step time
is a roofline of our own from the compiled program (`k2jax.hlo`, loops counted with their trip
counts), per chip: compiled FLOPs / peak FLOP/s; every argument read and every output written
once / HBM bandwidth (what a decode step over a large batch does: all weights and the cache once;
training moves more, one row's decode step less: it reads only its tokens' experts); collective
bytes received / ICI bandwidth. "step" assumes they overlap perfectly (the largest of the three),
"serial" that none does (their sum); tokens/s and MFU come from both.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import hlo, sharding
from k2jax.config import ModelConfig
from k2jax.flops import flops_per_token
from k2jax.model import Transformer, abstract_variables, partitioning
from k2jax.model.transformer import init_cache

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation: the HBM the TPU compiler says is available (its
  out-of-memory error), and the public bf16 dense peak, HBM bandwidth and ICI bandwidth (all
  links together)."""

  name: str
  hbm_bytes: float
  peak_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float


CHIPS = {
    "v5p": Chip("TPU v5p", 95.74 * GIB, 459e12, 2.765e12, 4800e9 / 8),
    "v6e": Chip("TPU v6e", 31.25 * GIB, 918e12, 1.64e12, 3584e9 / 8),
    "v5e": Chip("TPU v5e", 15.75 * GIB, 197e12, 0.819e12, 1600e9 / 8),
}
# Named slices (Cloud TPU names: v5p-N counts TensorCores, 2 per chip; v6e-N and v5e-N count
# chips) and the topology each is created with by default.
_SLICES = {
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
            512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16", 8192: "16x16x16"},
    "v6e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v5e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


def topology_name(name: str) -> str:
  """"v5p:8x8x8" as given; a named slice "v5p-1024" as its default topology, "v5p:8x8x8"."""
  m = re.fullmatch(r"(\w+)-(\d+)", name)
  if m is None:
    return name
  gen, n = m.group(1), int(m.group(2))
  if n not in _SLICES.get(gen, {}):
    raise ValueError(f"topology {name!r}: unknown slice (known: "
                     f"{', '.join(f'{g}-{k}' for g, s in _SLICES.items() for k in s)})")
  return f"{gen}:{_SLICES[gen][n]}"


def topology(name: str) -> tuple[list[jax.Device], Chip]:
  """The compile-only devices of TPU slice `name` ("v5p:4x4x4" or "v5p-128") and its chip."""
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"TPU compilation needs the libtpu package: pip install "
                     f"'jax[tpu]=={jax.__version__}'")
  full = topology_name(name)
  gen = full.split(":")[0]
  if gen not in CHIPS or ":" not in full:
    raise ValueError(f"topology {name!r}: give <generation>:<shape> or a named slice, "
                     f"generation one of {', '.join(CHIPS)} (e.g. v5p:4x4x4, v5p-128)")
  # Compile-only use: no TPU is opened, so several processes (test workers) may load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415 (imports libtpu's plugin machinery)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=full)
  except Exception as e:  # the plugin raises JaxRuntimeError with a multi-line message.
    raise ValueError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
  return list(desc.devices), CHIPS[gen]


def topology_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device],
                  name: str = "the slice") -> Mesh:
  """The (data, fsdp, expert, tensor) mesh over a slice's devices, every axis Auto.

  Axes are laid on the physical torus by `mesh_utils.create_device_mesh`; a logical size that is
  not a product of physical axis sizes (16 on 8x8x8) splits a physical axis, so that axis's ring
  is shared by two logical axes.
  """
  fixed = math.prod(v for v in mesh_cfg.values() if v != -1)
  if fixed > len(devices):
    raise ValueError(f"config.mesh needs {fixed} devices but {name} has {len(devices)} chips")
  sizes = sharding.mesh_sizes(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in sharding.MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    try:
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
      raise ValueError(f"config.mesh {shape} cannot be laid on {name}'s torus: "
                       f"{str(e).splitlines()[0]}") from None
  return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


@dataclasses.dataclass
class Report:
  """One program compiled for one slice; bytes, FLOPs and seconds are per chip."""

  program: str
  topology: str
  chip: Chip
  mesh: dict[str, int]
  tokens: int  # tokens the program processes (global)
  model_flops: float  # FLOP model (k2jax.flops) per chip
  compile_s: float  # seconds to `until`
  fits: bool
  # Work the compiled program does beyond the FLOP model, per chip, by source.
  extra_flops: dict[str, float] = dataclasses.field(default_factory=dict)
  error: str | None = None  # the compiler's reason when it does not fit
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  flops: float = 0.0  # compiled, loops counted
  collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
  xla_optimal_seconds: float | None = None
  # An analytic estimate to set beside the compiler's (bytes): plan.py's for a train step.
  planned: dict[str, float] = dataclasses.field(default_factory=dict)
  # The largest buffers of the compiler's memory report: (bytes, "shape, shape, ...").
  largest_buffers: list[tuple[int, str]] = dataclasses.field(default_factory=list)
  until: str = "code generation"  # how far the compile ran: or "buffer assignment" (early)
  compiled: Any = dataclasses.field(default=None, repr=False)  # the executable (not in to_dict)

  @property
  def num_chips(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def accounted_flops(self) -> float:
    """The FLOP model plus the known extra work: what the compiled FLOPs should be."""
    return self.model_flops + sum(self.extra_flops.values())

  @property
  def total_bytes(self) -> int:
    """Peak HBM: arguments + outputs not aliased to an argument + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def times(self) -> dict[str, float]:
    """Roofline terms (estimates, seconds): compute, hbm, ici; step (overlapped), serial."""
    t = {"compute": self.flops / self.chip.peak_flops,
         "hbm": (self.argument_bytes + self.output_bytes) / self.chip.hbm_bandwidth,
         "ici": sum(self.collective_bytes.values()) / self.chip.ici_bandwidth}
    return {**t, "step": max(t.values()), "serial": sum(t.values())}

  def tokens_per_s_per_chip(self, key: str = "step") -> float:
    return self.tokens / self.num_chips / self.times[key] if self.fits else 0.0

  def mfu(self, key: str = "step") -> float:
    """FLOP-model FLOPs / (estimated time x peak)."""
    return self.model_flops / (self.times[key] * self.chip.peak_flops) if self.fits else 0.0

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"}
    d["chip"] = dataclasses.asdict(self.chip)
    d["total_bytes"] = self.total_bytes
    if self.fits:
      d["estimated_seconds"] = self.times
      d["estimated_tokens_per_s_per_chip"] = self.tokens_per_s_per_chip()
      d["estimated_mfu"] = self.mfu()
      d["estimated_mfu_serial"] = self.mfu("serial")
    return d

  def format(self) -> str:
    """A few lines for a terminal."""
    mesh = " x ".join(f"{a} {n}" for a, n in self.mesh.items() if n > 1) or "1 chip"
    head = (f"{self.program} on {self.topology} ({self.num_chips} x {self.chip.name}, mesh "
            f"{mesh}): compiled to {self.until} in {self.compile_s:.0f} s")
    buffers = "".join(f"\n    {b / GIB:6.2f} GiB  {shapes}" for b, shapes in self.largest_buffers)
    if buffers:
      buffers = "\n  largest buffers (the compiler's memory report):" + buffers
    if not self.fits:
      return f"{head}\n  does not fit: {self.error}{buffers}"
    gb = lambda b: f"{b / GIB:.2f}"
    planned = ", ".join(f"{k} {gb(v)} ({v / getattr(self, k + '_bytes'):.2f}x the compiler's)"
                        for k, v in self.planned.items())
    t = self.times
    coll = ", ".join(f"{k} {gb(v)}" for k, v in self.collective_bytes.items() if v) or "none"
    xla = ("not given" if self.xla_optimal_seconds is None or self.xla_optimal_seconds <= 0
           else f"{self.xla_optimal_seconds * 1e3:.1f} ms")
    return "\n".join([
        head,
        f"  memory per chip (GiB): arguments {gb(self.argument_bytes)}, outputs "
        f"{gb(self.output_bytes)} ({gb(self.alias_bytes)} aliased), temporaries "
        f"{gb(self.temp_bytes)}; total {gb(self.total_bytes)} of {gb(self.chip.hbm_bytes)} HBM: "
        "fits",
        *([f"  plan.py's estimate (GiB): {planned}"] if planned else []),
        f"  FLOPs per chip: compiled {self.flops:.3e} = {self.flops / self.model_flops:.2f}x the "
        f"FLOP model's {self.model_flops:.3e}" + (
            "; with " + ", ".join(f"{k} {v:.3e}" for k, v in self.extra_flops.items())
            + f": {self.accounted_flops:.3e} expected ({self.flops / self.accounted_flops:.3f}x)"
            if self.extra_flops else ""),
        f"  collectives per chip (GiB received): {coll}",
        f"  estimated time (roofline, not measured): compute {t['compute'] * 1e3:.1f} ms, HBM "
        f"{t['hbm'] * 1e3:.1f} ms, ICI {t['ici'] * 1e3:.1f} ms -> {t['step'] * 1e3:.1f} ms "
        f"overlapped, {t['serial'] * 1e3:.1f} ms serial; XLA's estimate: {xla}",
        f"  estimated tokens/s per chip {self.tokens_per_s_per_chip():.0f} "
        f"({self.tokens_per_s_per_chip('serial'):.0f} serial); estimated MFU "
        f"{100 * self.mfu():.1f}% ({100 * self.mfu('serial'):.1f}% serial)",
    ]) + buffers


def _does_not_fit(e: Exception) -> str | None:
  """The compiler's one-line reason when `e` is an out-of-HBM compile error, else None."""
  for line in str(e).splitlines():
    if "RESOURCE_EXHAUSTED" in line and "memory" in line.lower():
      return line.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
  return None


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _largest_buffers(dump_dir: str, n: int) -> list[tuple[int, str]]:
  """The n largest buffers of the memory-usage report XLA wrote to `dump_dir`: its lines read
  "cumulative; size; offset; values; shapes"."""
  reports = sorted(pathlib.Path(dump_dir).glob("*memory-usage-report.txt"),
                   key=lambda p: p.stat().st_size)
  found = []
  for line in (reports[-1].read_text().splitlines() if reports else []):
    fields = [f.strip() for f in line.split(";")]
    size = re.fullmatch(r"([\d.]+)(B|KiB|MiB|GiB|TiB)", fields[1]) if len(fields) == 5 else None
    if size:
      shapes = fields[4] if len(fields[4]) <= 160 else fields[4][:157] + "..."
      found.append((round(float(size.group(1)) * _UNITS[size.group(2)]), shapes))
  return sorted(found, key=lambda b: -b[0])[:n]


def _dumped(dump_dir: str, suffix: str) -> pathlib.Path | None:
  """The largest file of the dump ending in `suffix` (the program's module, not helpers')."""
  found = sorted(pathlib.Path(dump_dir).glob(f"*{suffix}"), key=lambda p: p.stat().st_size)
  return found[-1] if found else None


def buffer_assignment_bytes(text: str) -> dict[str, int]:
  """Per-device argument / output / alias / temp bytes from a TPU buffer-assignment dump, as
  `memory_analysis()` reports them: parameters are arguments (those also live out are donated,
  aliased outputs); the preallocated temp of the default memory space is the temporaries."""
  out = dict.fromkeys(("argument", "output", "alias", "temp"), 0)
  for line in text.splitlines():
    m = re.match(r"allocation \d+: size (\d+), (.*)", line)
    if m is None or "thread-local" in m.group(2) or "constant" in m.group(2):
      continue
    size, rest = int(m.group(1)), m.group(2)
    if rest.startswith("parameter"):
      out["argument"] += size
      if "maybe-live-out" in rest:
        out["alias"] += size
        out["output"] += size
    elif rest.startswith("preallocated-temp"):
      out["temp"] += size
    elif rest.startswith(("maybe-live-out", "output")):  # "output": the result tuple's table.
      out["output"] += size
  return out


def compile_report(program: str, fn: Callable, args: Sequence, mesh: Mesh, chip: Chip,
                   topology_label: str, tokens: int, model_flops: float,
                   extra_flops: Mapping[str, float] | None = None,
                   largest_buffers: int = 8, early: bool = False) -> Report:
  """Lowers and compiles jitted `fn` on `args` (ShapeDtypeStructs) under `mesh`.

  `model_flops`: the FLOP model's count for the whole program; `extra_flops`: per chip.
  `largest_buffers`: list that many of the compiler's largest buffers (read from the memory
  report it dumps to a temporary directory).
  `early`: report as soon as the compiler has assigned buffers, from its dumps (the optimized
  HLO and the buffer assignment): everything but TPU code generation, which for K2 takes most of
  the compile and its host memory. Code generation then adds a little scratch to the
  temporaries (megabytes). The compile goes on in a daemon thread; end the process with
  os._exit to drop it.
  """
  t0 = time.perf_counter()
  base = dict(program=program, topology=topology_label, chip=chip, mesh=dict(mesh.shape),
              tokens=tokens, model_flops=model_flops / mesh.size,
              extra_flops=dict(extra_flops or {}))
  with jax.set_mesh(mesh):
    lowered = fn.lower(*args)
  dump = tempfile.mkdtemp(prefix="k2jax_aot_")
  options = {"xla_dump_to": dump} if largest_buffers or early else None
  result: dict[str, Any] = {}

  def compile_():
    try:
      result["compiled"] = lowered.compile(compiler_options=options)
    except Exception as e:  # XlaRuntimeError; anything but running out of HBM propagates.
      result["error"] = e

  try:
    if early:
      thread = threading.Thread(target=compile_, daemon=True)
      thread.start()
      while thread.is_alive() and _dumped(dump, "after_optimizations_after_buffer_assignment.txt"
                                          ) is None:
        time.sleep(1.0)
      time.sleep(2.0)  # the dump files of that stage are written together; let them land.
    else:
      compile_()
    compile_s = time.perf_counter() - t0
    buffers = _largest_buffers(dump, largest_buffers)
    if "error" in result:
      reason = _does_not_fit(result["error"])
      if reason is None:
        raise result["error"]
      return Report(**base, compile_s=compile_s, fits=False, error=reason,
                    largest_buffers=buffers, until="buffer assignment")  # where it stops
    compiled = result.get("compiled")
    if early:  # from the dumps, whether or not the compile has finished since.
      cost = {}
      mem = buffer_assignment_bytes(_dumped(dump, "buffer-assignment.txt").read_text())
      text = _dumped(dump, "after_optimizations.txt").read_text()
    else:
      m = compiled.memory_analysis()
      mem = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                 alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
      text, cost = compiled.as_text(), compiled.cost_analysis() or {}
  finally:
    shutil.rmtree(dump, ignore_errors=True)  # an early thread's later dumps just fail.
  return Report(**base, compile_s=compile_s, fits=True, argument_bytes=mem["argument"],
                output_bytes=mem["output"], alias_bytes=mem["alias"], temp_bytes=mem["temp"],
                flops=hlo.matmul_flops(text),
                collective_bytes=hlo.collective_bytes(text, mesh.size),
                xla_optimal_seconds=cost.get("optimal_seconds"), largest_buffers=buffers,
                compiled=compiled, until="buffer assignment" if early else "code generation")


def cache_spec(shape, mesh_shape: Mapping[str, int]) -> P:
  """The MLA cache [L, B, S, C] on a serving mesh: rows over the batch axes that divide B, and
  positions over the mesh axes left over where they divide S (a long context of few rows is
  split along its positions; attention then reduces its softmax across them)."""
  spec = sharding.logical_spec(("layers", "batch", "length", None), shape, mesh_shape)
  used = {a for e in spec if e for a in ((e,) if isinstance(e, str) else e)}
  rest, ways = [], 1
  for a in sharding.MESH_AXES:
    if a not in used and mesh_shape.get(a, 1) > 1 and shape[2] % (ways * mesh_shape[a]) == 0:
      rest.append(a)
      ways *= mesh_shape[a]
  return P(spec[0], spec[1], tuple(rest) or None, None)


def _serving_shardings(cfg: ModelConfig, mesh: Mesh, batch: int, context: int):
  variables = partitioning.variable_shardings(cfg, mesh)
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, context))
  cache_sh = jax.tree.map(lambda x: NamedSharding(mesh, cache_spec(x.shape, mesh.shape)), cache)
  return variables, cache, cache_sh


def _serving_report(program: str, cfg: ModelConfig, mesh: Mesh, chip: Chip,
                    topology_label: str, batch: int, context: int, new_tokens: int,
                    position: int, early: bool) -> Report:
  """`new_tokens` tokens per row at positions [position, position + new_tokens) through the
  model with the compressed MLA cache of `context` positions (donated, updated in place).
  The MoE dispatch is cfg's (k2jax.decode.generate runs "sort": it never drops a token)."""
  if position + new_tokens > context:
    raise ValueError(f"{program}: positions up to {position + new_tokens} exceed the cache "
                     f"context {context}")
  partitioning.check_config(cfg, mesh.shape)
  model = Transformer(cfg)
  variables = abstract_variables(cfg)
  var_sh, cache, cache_sh = _serving_shardings(cfg, mesh, batch, context)
  tokens_sh = NamedSharding(mesh, sharding.logical_spec(("batch", "length"), (batch, new_tokens),
                                                        mesh.shape))

  def serve(variables, cache, tokens_BT):
    positions_BT = jnp.broadcast_to(position + jnp.arange(new_tokens), tokens_BT.shape)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      (logits_BTV, _), mutated = model.apply({**variables, "cache": cache}, tokens_BT,
                                             positions_BT, decode=True, mutable=["cache"])
    return logits_BTV[:, -1], mutated["cache"]

  fn = jax.jit(serve, donate_argnums=1, in_shardings=(var_sh, cache_sh, tokens_sh),
               out_shardings=(NamedSharding(mesh, P()), cache_sh))
  tokens = jax.ShapeDtypeStruct((batch, new_tokens), jnp.int32)
  # Forward FLOPs: a third of training's; a token at position p attends p + 1 keys, which is
  # the causal average of a sequence of 2p tokens.
  mean_pos = position + (new_tokens + 1) / 2
  model_flops = flops_per_token(cfg, max(1, round(2 * mean_pos))) / 3 * batch * new_tokens
  return compile_report(program, fn, (variables, cache, tokens), mesh, chip, topology_label,
                        batch * new_tokens, model_flops, early=early)


def prefill_report(cfg: ModelConfig, mesh: Mesh, chip: Chip, topology_label: str, *, batch: int,
                   prompt_len: int, context: int, early: bool = False) -> Report:
  """Prefill of `batch` prompts of `prompt_len` tokens into a cache of `context` positions."""
  return _serving_report("prefill", cfg, mesh, chip, topology_label, batch, context,
                         prompt_len, 0, early)


def decode_report(cfg: ModelConfig, mesh: Mesh, chip: Chip, topology_label: str, *, batch: int,
                  context: int, early: bool = False) -> Report:
  """One decode step of `batch` rows, each attending a full cache of `context` positions."""
  return _serving_report("decode step", cfg, mesh, chip, topology_label, batch, context, 1,
                         context - 1, early)
