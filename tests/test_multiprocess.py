"""Two processes x 4 CPU devices on localhost reproduce the one-process run on 8 devices.

All three runs go through experiments/train.py; the two-process one joins over
jax.distributed (--coordinator_address, --num_processes, --process_id) with gloo collectives,
on a (data, fsdp, expert) = (2, 2, 2) mesh that spans both processes. Process 0 alone writes the
metrics; both write their shards of the orbax checkpoints.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import xla_flags

from k2jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).parents[1]
STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, corpus, devices, extra=()):
  args = [sys.executable, str(REPO / "experiments" / "train.py"),
          f"--config={REPO / 'experiments' / 'configs' / 'k2_nano.py'}", f"--workdir={workdir}",
          f"--config.data.source={corpus}", "--config.data.shuffle_window=16",
          "--config.data.read_threads=0", "--config.data.prefetch_batches=0",
          "--config.model.hidden_size=64", "--config.model.num_hidden_layers=2",
          "--config.model.n_routed_experts=8", "--config.model.num_experts_per_tok=2",
          "--config.model.dtype=float32", "--config.optimizer.ns_dtype=float32",
          "--config.mesh.fsdp=2", "--config.mesh.expert=2",
          "--config.sample.num_tokens=0", f"--config.train.steps={STEPS}",
          "--config.train.batch_size=8", "--config.train.seq_len=32",
          "--config.train.log_every=1", "--config.train.eval_every=2",
          "--config.train.eval_batches=1", "--config.checkpoint.every_steps=2",
          "--config.optimizer.warmup_steps=2", *extra]
  env = {**os.environ, "PYTHONPATH": str(REPO),
         "XLA_FLAGS": xla_flags(devices)}
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc, name):
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"
  return out


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_run(corpus, tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  port = _free_port()
  procs = [_launch(one, corpus, 8)] + [
      _launch(two, corpus, 4, [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}"]) for i in range(2)]
  outs = [_finish(p, n) for p, n in zip(procs, ("one process", "process 0", "process 1"))]
  assert "8 device(s)" in outs[0] and "8 device(s)" in outs[1]

  ref, got = read_metrics(one), read_metrics(two)
  assert [r["step"] for r in got if "loss" in r] == list(range(1, STEPS + 1))  # written once
  losses = lambda rs, key: [r[key] for r in rs if key in r]
  np.testing.assert_allclose(losses(got, "loss"), losses(ref, "loss"), rtol=1e-5)
  np.testing.assert_allclose(losses(got, "eval_loss"), losses(ref, "eval_loss"), rtol=1e-5)
  np.testing.assert_allclose(losses(got, "grad_norm"), losses(ref, "grad_norm"), rtol=1e-4)

  # Both processes' shards made it into the checkpoint: it equals the one-process checkpoint.
  for step in (2, STEPS):
    a, b = (_restore_numpy(w / "checkpoints" / str(step) / "state") for w in (one, two))
    leaves_a, leaves_b = (dict(_flat(x)) for x in (a, b))
    assert leaves_a.keys() == leaves_b.keys()
    for k in leaves_a:
      x, y = np.asarray(leaves_a[k], np.float64), np.asarray(leaves_b[k], np.float64)
      assert x.shape == y.shape, k
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=k)


def _restore_numpy(path):
  """A saved state as a tree of numpy arrays, whatever mesh it was saved from."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat(v, f"{prefix}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flat(v, f"{prefix}/{i}")
  else:
    yield prefix, tree
