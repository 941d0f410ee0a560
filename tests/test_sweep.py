"""Sweep runner: point declaration, and kill mid-sweep then rerun (skip finished, resume exact)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from k2jax.scaling import hyper, read_results
from k2jax.scaling.sweep import plan, point_name
from k2jax.train import default_config

REPO = pathlib.Path(__file__).parents[1]
DETERMINISTIC = ("name", "overrides", "steps", "loss", "loss_tail", "eval_loss", "params_total",
                 "params_activated", "flops_per_token", "tokens", "flops", "max_logit_peak")

SWEEP_FILE = '''
from k2jax.train import default_config

ANALYSIS = {{"kind": "compute", "arm": "seed", "x": "flops", "y": "eval_loss"}}


def get_config():
  c = default_config()
  c.model.update(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      intermediate_size=64, moe_intermediate_size=16, dtype="float32"))
  c.train.update(dict(steps=60, batch_size=4, seq_len=32, log_every=5, eval_every=60,
                      eval_batches=1))
  c.optimizer.update(dict(lr=1e-2, warmup_steps=3))
  c.checkpoint.update(dict(every_steps=20, keep=2, async_save=False))
  c.data.update(dict(source={corpus!r}, read_threads=0, prefetch_batches=0, shuffle_window=8))
  c.mesh.data = 1
  c.sample.num_tokens = 0
  return c


def get_hyper(h):
  return h.product([h.sweep("seed", [0, 1]), h.fixed("label.arm", "x")])
'''


def test_product_zip_and_apply():
  points = hyper.product([
      hyper.zipit([hyper.sweep("model.hidden_size", [32, 64]),
                   hyper.sweep("train.steps", [10, 20])]),
      hyper.sweep("optimizer.name", ["muonclip", "adamw"]),
      hyper.fixed("label.size", "s")])
  assert points[1] == {"model.hidden_size": 32, "train.steps": 10, "optimizer.name": "adamw",
                       "label.size": "s"}
  assert len(points) == 4 and points[3]["model.hidden_size"] == 64
  config = hyper.apply(default_config(), points[3])
  assert (config.model.hidden_size, config.train.steps, config.optimizer.name) == (64, 20, "adamw")
  assert default_config().model.hidden_size is None  # apply copies.
  names = [n for n, _, _ in plan(default_config(), points)]
  assert len(set(names)) == 4
  assert names[0].startswith("hidden_size=32,steps=10,name=muonclip,size=s_")
  # The name hashes the resolved config: another base budget gives another name.
  other = hyper.apply(default_config(), {"train.batch_size": 8})
  assert point_name(other, points[0]) != names[0]
  with pytest.raises(ValueError, match="zipit"):
    hyper.zipit([hyper.sweep("seed", [0, 1]), hyper.sweep("train.steps", [1])])
  with pytest.raises(ValueError, match="'model.hidden_sise'"):
    hyper.apply(default_config(), {"model.hidden_sise": 3})
  with pytest.raises(ValueError, match="twice"):
    plan(default_config(), [{"seed": 1}, {"seed": 1}])


def _sweep_cmd(sweep_file, workdir):
  return [sys.executable, str(REPO / "experiments" / "sweep.py"), f"--sweep={sweep_file}",
          f"--workdir={workdir}"]


@pytest.mark.slow
def test_kill_mid_sweep_then_rerun_skips_finished_and_resumes_exactly(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    (corpus / f"m{i}.py").write_text("".join(
        f"def f{j}(x):\n    return x * {rng.integers(9)}\n" for j in range(20)))
  sweep_file = tmp_path / "tiny_sweep.py"
  sweep_file.write_text(SWEEP_FILE.format(corpus=str(corpus)))
  env = {**os.environ, "PYTHONPATH": str(REPO),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

  whole = tmp_path / "whole"
  subprocess.run(_sweep_cmd(sweep_file, whole), env=env, check=True, capture_output=True)
  reference = {r["name"]: r for r in read_results(whole)}
  assert len(reference) == 2

  broken = tmp_path / "broken"
  proc = subprocess.Popen(_sweep_cmd(sweep_file, broken), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  second = json.loads((whole / "sweep.json").read_text())["points"][1]["name"]
  ckpts = broken / "points" / second / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (ckpts / "20").exists():
    time.sleep(0.01)
  assert proc.poll() is None, "the sweep ended before the kill"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  before = (broken / "results.jsonl").read_text()
  assert len(before.splitlines()) == 1
  first = json.loads(before)["name"]
  first_metrics = (broken / "points" / first / "metrics.jsonl").read_text()

  out = subprocess.run(_sweep_cmd(sweep_file, broken), env=env, check=True, capture_output=True,
                       text=True).stdout
  assert "1 already done, 1 to run" in out and "resumed from" in out
  after = (broken / "results.jsonl").read_text()
  assert after.startswith(before)  # the finished point's row is untouched ...
  assert (broken / "points" / first / "metrics.jsonl").read_text() == first_metrics  # not rerun.
  rows = {r["name"]: r for r in read_results(broken)}
  assert rows.keys() == reference.keys()
  for name, row in rows.items():
    assert {k: row[k] for k in DETERMINISTIC} == {k: reference[name][k] for k in DETERMINISTIC}
  # and the resumed point trained every step exactly as the uninterrupted one.
  losses = [[r["loss"] for r in map(json.loads, (d / "points" / second / "metrics.jsonl")
             .read_text().splitlines()) if "loss" in r] for d in (whole, broken)]
  assert losses[0] == losses[1] and len(losses[0]) == 12


SWEEPS = sorted((pathlib.Path(__file__).parents[1] / "experiments" / "sweeps").glob("*.py"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_plan_valid_points(path):
  """Every point of a shipped sweep is a valid experiment config and model; the file opens with
  the command that runs it."""
  from k2jax.scaling.sweep import load_sweep_file
  from k2jax.train import model_config

  module = load_sweep_file(path)
  planned = plan(module.get_config(), module.get_hyper(hyper))
  assert len(planned) >= 3
  for _, _, config in planned:
    model_config(config, 257)
  assert path.read_text().splitlines()[2].strip().startswith("python experiments/sweep.py")
  assert module.ANALYSIS["kind"] in ("compute", "curves")
