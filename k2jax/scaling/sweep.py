"""The resumable sweep runner: every point trains through `k2jax.train.train` in its own workdir.

Layout of a sweep directory DIR:
  DIR/sweep.json       the sweep's name, analysis spec and points (written at every start)
  DIR/points/<name>/   one training workdir per point (checkpoints, metrics.jsonl, attempts.jsonl)
  DIR/results.jsonl    one row per finished point, appended when the point finishes

A point's name is a readable summary of its overrides plus a hash of its whole resolved config, so
changing the base budget makes new points instead of mixing results. On a rerun, points with a row
are skipped; unfinished ones resume from their latest checkpoint (train() does that).

A row: name, overrides, steps, loss (last logged) and loss_tail (mean of the last 10% of logged
steps), eval_loss, params_total / params_activated (/ _no_embed), flops_per_token, tokens, flops
(= flops_per_token * tokens), max_logit_peak, wall_s (summed over the attempts that returned; a
killed attempt's time is lost), attempts, and diverged (the error when the loss turned NaN/Inf:
such a row keeps the last finite metrics and the planned tokens; the analysis leaves it out).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import pathlib
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from k2jax.scaling import hyper

RESULTS_FILE = "results.jsonl"
SWEEP_FILE = "sweep.json"


def load_sweep_file(path: str | pathlib.Path):
  """Imports a sweep file: it defines get_config() and get_hyper(hyper), optionally ANALYSIS."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"sweep file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"k2jax_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for attr in ("get_config", "get_hyper"):
    if not callable(getattr(module, attr, None)):
      raise ValueError(f"sweep file {path} defines no {attr}()")
  return module


def point_name(config, point: hyper.Point) -> str:
  """`<last key>=<value>,..._<hash of the resolved config>`, filesystem-safe."""
  readable = ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
  readable = re.sub(r"[^A-Za-z0-9_=.,+-]+", "-", readable)[:80] or "base"
  digest = hashlib.sha1(config.to_json(sort_keys=True).encode()).hexdigest()[:8]
  return f"{readable}_{digest}"


def read_results(directory: str | pathlib.Path) -> list[dict]:
  """The rows of DIR/results.jsonl in file order ([] when absent)."""
  path = pathlib.Path(directory) / RESULTS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tail_mean(values: Sequence[float], fraction: float = 0.1) -> float:
  n = max(1, math.ceil(len(values) * fraction))
  return float(sum(values[-n:]) / n)


def _result_row(config, name: str, point: hyper.Point, workdir: pathlib.Path,
                diverged: str | None = None) -> dict:
  """The results.jsonl row of a finished (or diverged) point, from its metrics and config."""
  from k2jax import data as data_lib
  from k2jax.flops import flops_per_token
  from k2jax.model.counting import count_params
  from k2jax.train import config as config_lib
  from k2jax.train.metrics import read_metrics

  records = read_metrics(workdir)
  train_rows = [r for r in records if "loss" in r]
  eval_rows = [r for r in records if "eval_loss" in r]
  tokenizer = data_lib.build_tokenizer(config.data, str(workdir))
  cfg = config_lib.model_config(config, tokenizer.vocab_size)
  counts = count_params(cfg)
  fpt = flops_per_token(cfg, config.train.seq_len)
  tokens = config.train.steps * config.train.batch_size * config.train.seq_len
  attempts = [json.loads(line) for line in (workdir / "attempts.jsonl").read_text().splitlines()]
  return {
      "name": name,
      "overrides": point,
      "steps": config.train.steps,
      "loss": train_rows[-1]["loss"] if train_rows else math.nan,
      "loss_tail": _tail_mean([r["loss"] for r in train_rows]) if train_rows else math.nan,
      "eval_loss": eval_rows[-1]["eval_loss"] if eval_rows else None,
      "params_total": counts["total"],
      "params_activated": counts["activated"],
      "params_activated_no_embed": counts["activated_no_embed"],
      "flops_per_token": fpt,
      "tokens": tokens,
      "flops": fpt * tokens,
      "max_logit_peak": max((r["max_logit"] for r in train_rows), default=math.nan),
      "wall_s": sum(a["wall_s"] for a in attempts),
      "attempts": len(attempts),
      "diverged": diverged,
  }


def _exit_with_parent(parent_pid: int) -> None:
  """In a worker: exits when the sweep process dies, so a killed sweep leaves no orphan trainer."""
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(0.5)
    os._exit(1)
  threading.Thread(target=watch, daemon=True).start()


def run_point(config, name: str, point: hyper.Point, directory: str,
              parent_pid: int | None = None) -> dict | None:
  """Trains one point (resuming) and returns its row, or None when training was stopped early.

  A point whose loss turns NaN/Inf gets a row with `diverged` set (its last finite metrics).
  """
  from k2jax.train import train

  if parent_pid is not None:
    _exit_with_parent(parent_pid)
  workdir = pathlib.Path(directory) / "points" / name
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  try:
    summary, diverged = train(config, str(workdir)), None
  except FloatingPointError as e:
    summary, diverged = {"start_step": None, "step": None, "stopped": None}, str(e)
  with open(workdir / "attempts.jsonl", "a") as f:
    f.write(json.dumps({"start_step": summary["start_step"], "end_step": summary["step"],
                        "wall_s": time.perf_counter() - start, "diverged": diverged}) + "\n")
  if summary["stopped"] is not None:
    return None
  return _result_row(config, name, point, workdir, diverged)


def plan(base_config, points: Sequence[hyper.Point]) -> list[tuple[str, hyper.Point, Any]]:
  """(name, overrides, resolved config) per point; duplicate points raise."""
  from k2jax.train import config as config_lib

  planned, seen = [], set()
  for point in points:
    config = hyper.apply(base_config, point)
    config_lib.validate(config)
    name = point_name(config, point)
    if name in seen:
      raise ValueError(f"sweep: point {point} appears twice")
    seen.add(name)
    planned.append((name, point, config))
  return planned


def run_sweep(base_config, points: Sequence[hyper.Point], directory: str | pathlib.Path,
              parallel: int = 1, analysis: dict | None = None, title: str = "sweep") -> list[dict]:
  """Runs every point without a row in DIR/results.jsonl; returns all rows, in plan order.

  parallel > 1 trains that many points at once in spawned worker processes; parallel = 1 trains
  in this process.
  """
  if parallel < 1:
    raise ValueError(f"sweep: parallel must be >= 1, got {parallel}")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  planned = plan(base_config, points)
  (directory / SWEEP_FILE).write_text(json.dumps(
      {"title": title, "analysis": analysis or {},
       "points": [{"name": n, "overrides": p} for n, p, _ in planned]}, indent=2, default=str))
  done = {r["name"] for r in read_results(directory)}
  todo = [(n, p, c) for n, p, c in planned if n not in done]
  print(f"sweep {title}: {len(planned)} points, {len(planned) - len(todo)} already done, "
        f"{len(todo)} to run", flush=True)

  def record(row: dict | None) -> bool:
    if row is None:
      return False
    with open(directory / RESULTS_FILE, "a") as f:
      f.write(json.dumps(row, default=str) + "\n")
    status = f"DIVERGED ({row['diverged']})" if row["diverged"] else "finished"
    print(f"sweep {title}: {status} {row['name']}: loss {row['loss']:.4f} eval "
          f"{row['eval_loss']} in {row['wall_s']:.0f}s", flush=True)
    return True

  if parallel == 1:
    for name, point, config in todo:
      if not record(run_point(config, name, point, str(directory))):
        break
  else:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=context) as pool:
      futures = [pool.submit(run_point, config, name, point, str(directory), os.getpid())
                 for name, point, config in todo]
      for future in concurrent.futures.as_completed(futures):
        record(future.result())
  rows = {r["name"]: r for r in read_results(directory)}
  return [rows[n] for n, _, _ in planned if n in rows]


def run_sweep_file(path: str | pathlib.Path, directory: str | pathlib.Path, parallel: int = 1,
                   overrides: hyper.Point | None = None) -> list[dict]:
  """Runs a sweep file; `overrides` (dotted keys) change its base config, e.g. a smaller budget."""
  module = load_sweep_file(path)
  base = hyper.apply(module.get_config(), overrides or {})
  points = module.get_hyper(hyper)
  return run_sweep(base, points, directory, parallel, getattr(module, "ANALYSIS", None),
                   pathlib.Path(path).stem)
