"""train(): end to end on a tiny model, exact resume, fallback, NaN guard, setup errors."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from k2jax.train import ConfigError, default_config, train
from k2jax.train.metrics import read_metrics, truncate_metrics

REPO = pathlib.Path(__file__).parents[1]
REQUIRED = ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "max_logit",
            "clipped_heads", "expert_load_max_over_mean", "dropped_frac")
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2)


def tiny_config(corpus, **train):
  c = default_config()
  for k, v in TINY_MODEL.items():
    c.model[k] = v
  c.train.update({**dict(steps=30, batch_size=8, seq_len=32, log_every=1, eval_every=10,
                         eval_batches=2), **train})
  c.optimizer.update(dict(lr=1e-2, warmup_steps=3))
  c.checkpoint.update(dict(every_steps=10, keep=2))
  c.data.update(dict(source=corpus, read_threads=0, prefetch_batches=0, shuffle_window=16))
  c.mesh.data = 1
  c.sample.update(dict(num_tokens=8, temperature=0.8))
  return c


def _steps(checkpoints):
  return [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def run30(corpus, tmp_path_factory):
  """One 30-step run: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp("run30")
  return workdir, train(tiny_config(corpus), str(workdir))


def test_end_to_end_then_resume_is_a_no_op(corpus, run30):
  workdir, summary = run30
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, 31))
  for r in records:
    assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [10, 20, 30]
  assert all(np.isfinite(r["eval_bits_per_byte"]) for r in evals)
  losses = [r["loss"] for r in records]
  assert np.mean(losses[-5:]) < losses[0] - 1.5, losses
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "training.png").stat().st_size > 10_000
  assert sorted(_steps(workdir / "checkpoints")) == [20, 30]
  assert isinstance(summary["sample"], str) and summary["step"] == 30
  # Rerun on the finished workdir: restores step 30, trains nothing, writes nothing new.
  again = train(tiny_config(corpus), str(workdir))
  assert again["start_step"] == 30 and again["step"] == 30
  assert read_metrics(workdir) == records


def test_corrupt_latest_checkpoint_falls_back_and_resumes_exactly(corpus, run30, tmp_path,
                                                                  caplog):
  reference, _ = run30
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  for p in (workdir / "checkpoints" / "30" / "state").rglob("*"):
    if p.is_file():
      p.write_bytes(p.read_bytes()[:7])
  with caplog.at_level(logging.WARNING):
    summary = train(tiny_config(corpus), str(workdir))
  assert "step 30 is unreadable" in caplog.text
  assert summary["start_step"] == 20
  a, b = _losses(reference), _losses(workdir)
  assert list(b) == list(range(1, 31))
  assert [a[s] for s in range(21, 31)] == [b[s] for s in range(21, 31)]


@pytest.mark.slow
def test_data_parallel_matches_one_device(corpus, run30, tmp_path):
  """The batch split over 2 devices (params replicated) gives the one-device losses."""
  config = tiny_config(corpus, steps=3, eval_every=0)
  config.mesh.data = 2
  config.sample.num_tokens = 0
  train(config, str(tmp_path))
  a, b = _losses(run30[0]), _losses(tmp_path)
  np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-4)


STEPS = 80
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cli(workdir, corpus, steps):
  args = [sys.executable, str(REPO / "experiments" / "train.py"),
          f"--config={REPO / 'experiments' / 'configs' / 'k2_nano.py'}", f"--workdir={workdir}",
          f"--config.data.source={corpus}", "--config.data.shuffle_window=16",
          "--config.mesh.data=1", "--config.sample.num_tokens=0", f"--config.train.steps={steps}",
          "--config.train.batch_size=8", "--config.train.seq_len=32",
          "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.checkpoint.every_steps=20", "--config.optimizer.warmup_steps=3"]
  args += [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]
  return args


def _run_until(workdir, corpus, env, sig, ready):
  """Starts a CLI run, sends `sig` once ready(workdir) holds; returns (exit code, stdout)."""
  proc = subprocess.Popen(_cli(workdir, corpus, STEPS), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not ready(workdir):
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before the signal"
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out


@pytest.mark.slow
def test_sigterm_sigkill_and_restart_resume_bit_for_bit(corpus, tmp_path):
  """Uninterrupted vs. SIGTERM, restart, SIGKILL, restart: every step's loss is identical.

  The runs share a persistent compilation cache: restarts load the step compiled by the first.
  """
  env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  whole, broken = tmp_path / "whole", tmp_path / "broken"
  subprocess.run(_cli(whole, corpus, STEPS), env=env, check=True, capture_output=True)
  code, out = _run_until(broken, corpus, env, signal.SIGTERM,
                         lambda w: max(_losses(w), default=0) > 20)
  assert code == 0
  stopped = int(out.split("SIGTERM: saved step ")[1].split(",")[0])
  assert max(_losses(broken)) == stopped and (broken / "checkpoints" / str(stopped)).exists()
  code, out = _run_until(broken, corpus, env, signal.SIGKILL, lambda w: (
      max(_losses(w), default=0) > stopped + 30 and max(_steps(w / "checkpoints")) > stopped))
  assert code == -signal.SIGKILL and f"resumed from {broken / 'checkpoints' / str(stopped)}" in out
  out = subprocess.run(_cli(broken, corpus, STEPS), env=env, check=True, capture_output=True,
                       text=True).stdout
  resumed = int(out.split("resumed from ")[1].split("\n")[0].rsplit("/", 1)[1])
  assert resumed > stopped
  a, b = _losses(whole), _losses(broken)
  assert list(a) == list(b) == list(range(1, STEPS + 1))
  assert a == b


def test_metrics_read_while_written_and_truncated_whole(tmp_path):
  """A reader polling a live run's metrics.jsonl (as the kill tests do) may catch the last line
  half written: it gets the complete records. Truncation replaces the file in one step."""
  lines = [json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 4)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(lines) + lines[0][:9])
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  path.write_text("".join(lines)[:-1])  # complete JSON, newline not yet written: kept.
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  truncate_metrics(tmp_path, 2)
  assert path.read_text() == "".join(lines[:2]) and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.slow  # a second training run with its own compiles.
def test_nan_loss_stops_without_saving_the_bad_state(corpus, tmp_path):
  config = tiny_config(corpus, steps=10, eval_every=0)
  config.optimizer.update(dict(name="adamw", lr=1e30, warmup_steps=0, grad_clip=0.0))
  config.checkpoint.every_steps = 1
  with pytest.raises(FloatingPointError, match=r"^step 2: (loss|grad_norm) is nan; stopping "
                     r"without saving \(last good checkpoint: none\)$"):
    train(config, str(tmp_path))
  # Step 1's update already overflowed the state: the checkpoint guard refused to write it.
  assert os.listdir(tmp_path / "checkpoints") == []


def test_setup_errors_are_one_line_and_name_the_culprit(corpus, run30, tmp_path):
  config = tiny_config(corpus)
  config.data.source = str(tmp_path / "no_such_dir")
  with pytest.raises(ConfigError, match="data.source") as e:
    train(config, str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match=r"^workdir .*file/sub: not writable"):
    train(tiny_config(corpus), str(tmp_path / "file" / "sub"))
  config = tiny_config(corpus)
  config.model.hidden_size = 96
  with pytest.raises(ConfigError, match=r"^workdir .* holds a run with hidden_size=64, this "
                     r"config has 96 \(1 field\(s\) differ\); use another workdir$"):
    train(config, str(run30[0]))
  config = tiny_config(corpus)
  config.optimizer.name = "sgd"
  with pytest.raises(ConfigError, match=r"^config\.optimizer\.name"):
    train(config, str(tmp_path / "w2"))
  assert not (tmp_path / "w2").exists()


@pytest.mark.parametrize("override, error", [
    ("--config.optimizer.schedule=linear", "error: config.optimizer.schedule must be one of "
     "('wsd', 'cosine', 'constant'), got 'linear'"),
    ("--config.train.stepz=3", 'error: bad config override: stepz Did you mean "steps" '
     'instead of "stepz"?'),
])
def test_cli_bad_override_is_one_line(corpus, tmp_path, override, error):
  out = subprocess.run(_cli(tmp_path / "w", corpus, 5) + [override], env=ENV,
                       capture_output=True, text=True)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [error]
  assert out.stdout == ""
