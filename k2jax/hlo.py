"""What one device of a compiled, partitioned XLA program does, read from its HLO text.

`collective_bytes(hlo, num_devices)`: bytes each device receives, by kind of collective;
`matmul_flops(hlo)`: FLOPs of its dots, convolutions and TPU grouped-matmul (ragged_dot)
kernels (2 per multiply-add). Both count an
instruction as many times as it runs: a while loop's body times its trip count (XLA:CPU writes it
as `known_trip_count`; the TPU compiler does not, so it is read from the loop condition's
`counter < N`), a conditional's costliest branch once. XLA's own `cost_analysis()` counts a loop
body once, so a scan over 60 layers reports the FLOPs of one.

Bytes per collective follow ring costs over its group of n devices: all-gather and all-to-all
receive (n-1)/n of their result, reduce-scatter n-1 times its result, all-reduce 2(n-1)/n of it,
collective-permute all of it. The TPU compiler writes a reduce-scatter as an all-reduce inside a
fusion named all-reduce-scatter; it is counted as the reduce-scatter it is.

"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import NamedTuple

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_WHILE = re.compile(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|(?:true|false)_computation=%?"
                       r"([\w.\-]+))")
_CONST = re.compile(r"^s(?:32|64)\[\] constant\((\d+)\)$")


def _dims(shape_text: str) -> list[int]:
  m = _SHAPE.search(shape_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _bytes(shape_text: str) -> int:
  return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _SHAPE.findall(shape_text))


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
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  return num_devices


def _moved(kind: str, result_bytes: int, n: int) -> float:
  if n <= 1:
    return 0.0
  return {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n, "reduce-scatter": n - 1,
          "all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}[kind] * result_bytes


def _conv_flops(out_shape: str, lhs_shape: str, rest: str) -> float:
  """2 x output elements x input features per group x valid window taps (zero-free)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
  lhs_dims, out_dims = _dims(lhs_shape), _dims(out_shape)
  if labels is None or len(lhs_dims) != len(labels.group(1)):
    return 0.0
  lhs_l, _, out_l = labels.groups()
  groups = int((re.search(r"feature_group_count=(\d+)", rest) or [0, 1])[1])
  spatial = [c for c in lhs_l if c.isdigit()]
  window = re.search(r"window=\{([^}]*)\}", rest)
  attrs = dict(re.findall(r"(\w+)=([\dx_\-]+)", window.group(1))) if window else {}
  field = lambda k, default: ([int(v) for v in attrs[k].split("x")] if k in attrs
                              else [default] * len(spatial))
  size, stride, lhs_dil, rhs_dil = (field("size", 1), field("stride", 1),
                                    field("lhs_dilate", 1), field("rhs_dilate", 1))
  pads = ([tuple(int(v) for v in p.split("_")) for p in attrs["pad"].split("x")]
          if "pad" in attrs else [(0, 0)] * len(spatial))
  taps = 1
  for i, c in enumerate(spatial):
    n_in = lhs_dims[lhs_l.index(c)]
    n_out = out_dims[out_l.index(c)]
    dilated = (n_in - 1) * lhs_dil[i] + 1
    total = 0
    for o in range(n_out):
      for k in range(size[i]):
        pos = o * stride[i] + k * rhs_dil[i] - pads[i][0]
        total += 0 <= pos < dilated and pos % lhs_dil[i] == 0
    taps *= total
  non_spatial_out = math.prod(d for d, c in zip(out_dims, out_l) if not c.isdigit())
  features = lhs_dims[lhs_l.index("f")] // groups
  return 2.0 * non_spatial_out * features * taps


def _dot_flops(out_shape: str, lhs_shape: str, rest: str) -> float:
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  lhs = _dims(lhs_shape)
  k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
  return 2.0 * math.prod(_dims(out_shape)) * k


def _ragged_dot_flops(out_shape: str, rest: str) -> float:
  """A TPU grouped-matmul kernel (jax.lax.ragged_dot and its transposes): of its float operands
  and result, two are [M, a] and [M, b] over the ragged rows and one is [G, a, b] (or [G, b, a]):
  2 M a b."""
  constraints = re.search(r"operand_layout_constraints=\{(.*?)\}, \w+=", rest)
  shapes = [[int(d) for d in dims.split(",") if d] for dt, dims in
            _SHAPE.findall((constraints.group(1) if constraints else "") + " " + out_shape)
            if dt.startswith(("f", "bf"))]
  rows = [s for s in shapes if len(s) == 2]
  if len(rows) != 2 or rows[0][0] != rows[1][0]:
    return 0.0
  return 2.0 * rows[0][0] * rows[0][1] * rows[1][1]


class _Instr(NamedTuple):
  name: str
  shape: str
  op: str
  rest: str
  line: str

  @property
  def operands(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", self.rest.split(")")[0])


def _parse(hlo: str) -> tuple[dict[str, list[_Instr]], str]:
  comps: dict[str, list[_Instr]] = {}
  comp, entry = None, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      comp = m.group(1)
      comps[comp] = []
      if line.startswith("ENTRY"):
        entry = comp
      continue
    m = _INSTR.match(line)
    if comp is not None and m is not None:
      comps[comp].append(_Instr(*m.groups(), line))
  if entry is None:
    raise ValueError("HLO text has no ENTRY computation")
  return comps, entry


class _Module:
  """Per computation: its own costs, and the computations it runs with their multiplicities."""

  def __init__(self, hlo: str, num_devices: int):
    comps, self.entry = _parse(hlo)
    self.own: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    self.calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    self.branches: dict[str, list[list[str]]] = defaultdict(list)
    self.constants: dict[str, dict[str, int]] = defaultdict(dict)
    self.roots: dict[str, str] = {}
    self._totals: dict[str, dict[str, float]] = {}
    whiles = []
    for comp, instrs in comps.items():
      shapes = {ins.name: ins.shape for ins in instrs}
      for ins in instrs:
        self._visit(comp, ins, shapes, num_devices, whiles)
    for comp, cond, body, trip in whiles:
      n = self._trip_count(cond) if trip is None else trip
      self.calls[comp] += [(cond, n + 1), (body, n)]

  def _visit(self, comp, ins: _Instr, shapes, num_devices, whiles):
    name, shape, op, rest = ins.name, ins.shape, ins.op, ins.rest
    operands = ins.operands
    const = _CONST.match(f"{shape.split('{')[0]} {op}({rest.split(')')[0]})")
    if const:
      self.constants[comp][name] = int(const.group(1))
    if ins.line.lstrip().startswith("ROOT"):
      self.roots[comp] = rest
    if op in ("convolution", "dot") and operands:
      self.own[comp]["flops"] += (_conv_flops if op == "convolution" else _dot_flops)(
          shape, shapes.get(operands[0], ""), rest)
    elif op == "custom-call" and name.startswith("ragged-dot") and "metadata" not in name:
      self.own[comp]["flops"] += _ragged_dot_flops(shape, rest)
    kind = op.removesuffix("-start")
    if kind in KINDS:
      # An async start's tuple holds operand and result (and flags): the result is the largest.
      size = (max(_bytes(f"{dt}[{d}]") for dt, d in _SHAPE.findall(shape))
              if op.endswith("-start") else _bytes(shape))
      n = _group_size(ins.line, num_devices)
      if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
        # Its all-reduce's input is the whole tensor: (n-1)/n of it is n-1 times the result.
        self.own[comp]["reduce-scatter"] += _moved("all-gather", size, n)
      else:
        self.own[comp][kind] += _moved(kind, size, n)
    if op == "while":
      w = _WHILE.search(rest)
      trip = _TRIP.search(rest)
      whiles.append((comp, w.group(1), w.group(2), int(trip.group(1)) if trip else None))
    elif op == "conditional":
      names = [n.strip().lstrip("%") for group, single in _BRANCHES.findall(rest)
               for n in (group.split(",") if group else [single]) if n.strip()]
      self.branches[comp].append(names)
    else:
      for c in _CALLS.finditer(rest):
        self.calls[comp].append((c.group(1), 1))

  def _trip_count(self, cond: str) -> int:
    """N of a `counter < N` loop condition (JAX's scans and maps start at 0); 1 if unknown."""
    root = self.roots.get(cond, "")
    if "direction=LT" not in root:
      return 1
    for operand in re.findall(r"%([\w.\-]+)", root.split(")")[0]):
      if operand in self.constants[cond]:
        return self.constants[cond][operand]
    return 1

  def total(self, name: str) -> dict[str, float]:
    """Costs of one run of computation `name`, with everything it calls (HLO calls form a DAG)."""
    if name in self._totals:
      return self._totals[name]
    out = defaultdict(float, self.own.get(name, {}))
    for callee, times in self.calls.get(name, []):
      for k, v in self.total(callee).items():
        out[k] += times * v
    for names in self.branches.get(name, []):
      costs = [self.total(b) for b in names]
      for k in {k for c in costs for k in c}:
        out[k] += max(c.get(k, 0.0) for c in costs)
    self._totals[name] = out
    return out


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
  """Bytes received per device by each kind of collective (KINDS) of a partitioned HLO module."""
  module = _Module(hlo, num_devices)
  totals = module.total(module.entry)
  return {k: totals.get(k, 0.0) for k in KINDS}


def matmul_flops(hlo: str) -> float:
  """FLOPs of the dots and convolutions one device runs, loops counted with their trip counts."""
  module = _Module(hlo, 1)
  return module.total(module.entry).get("flops", 0.0)

