"""Metric sinks: `<workdir>/metrics.jsonl`, TensorBoard event files, and a console progress line."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

from k2jax.train.workdir import METRICS_FILE, TENSORBOARD_DIR


def to_python(value: Any) -> Any:
  """Arrays and numpy scalars -> floats / ints / lists for JSON."""
  value = np.asarray(value)
  if value.ndim:
    return value.tolist()
  return value.item()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`, in order. A live run may be writing its last line:
  an unterminated last line that is not yet valid JSON is left out."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  *lines, last = path.read_text().split("\n")
  records = [json.loads(line) for line in lines if line.strip()]
  try:
    return records + ([json.loads(last)] if last.strip() else [])
  except json.JSONDecodeError:
    return records


def truncate_metrics(workdir: str | pathlib.Path, last_step: int) -> None:
  """Drops records after `last_step` (a run resumed from an earlier checkpoint rewrites them).
  The file is replaced whole, so a reader never sees it half rewritten."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if path.exists():
    kept = [r for r in read_metrics(workdir) if r["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def console_line(record: dict, total_steps: int, eta_s: float | None) -> str:
  """One progress line, e.g. 'step 120/600 loss 2.345 max_logit 41.2 ... eta 3m12s'."""
  parts = [f"step {record['step']}/{total_steps}"]
  for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("eval_bits_per_byte", "{:.3f}"),
                   ("max_logit", "{:.1f}"), ("clipped_heads", "{:d}"),
                   ("expert_load_max_over_mean", "{:.2f}"), ("grad_norm", "{:.3f}"),
                   ("lr", "{:.2e}"), ("tokens_per_sec", "{:,.0f}"), ("mfu", "{:.1%}")):
    if key in record and isinstance(record[key], (int, float)) and math.isfinite(record[key]):
      name = {"expert_load_max_over_mean": "load_max/mean", "eval_bits_per_byte": "eval_bpb",
              "tokens_per_sec": "tok/s", "clipped_heads": "clipped"}.get(key, key)
      parts.append(f"{name} {fmt.format(record[key])}")
    elif key in record:
      parts.append(f"{key} {record[key]}")
  parts.append(f"eta {format_duration(eta_s) if eta_s is not None else '--'}")
  return " | ".join(parts)


class MetricsWriter:
  """Appends records to metrics.jsonl, mirrors scalars to TensorBoard, prints progress lines."""

  def __init__(self, workdir: str | pathlib.Path, total_steps: int, console: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.total_steps = total_steps
    self._file = open(self.workdir / METRICS_FILE, "a")
    self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR))
    self._console = console
    self._first: tuple[int, float] | None = None  # (step, time) of the first record.

  def write(self, record: dict) -> None:
    record = {k: to_python(v) for k, v in record.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    step = record["step"]
    for key, value in record.items():
      if key == "step":
        continue
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{key}/{i}", v, step)
      else:
        self._tb.add_scalar(key, value, step)
    now = time.perf_counter()
    if self._first is None:
      self._first = (step, now)
    if self._console and "loss" in record:
      done = step - self._first[0]
      eta = (now - self._first[1]) / done * (self.total_steps - step) if done else None
      print(console_line(record, self.total_steps, eta), file=sys.stdout, flush=True)

  def close(self) -> None:
    self._tb.close()
    self._file.close()
