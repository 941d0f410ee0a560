"""`train(config, workdir)`: one experiment end to end.

Order: validate the config, the workdir, the data and the tokenizer (one-line ConfigError before
anything compiles); build the model, optimizer and state; resume from the latest valid checkpoint;
compile; train with metrics read one step late; evaluate, log, checkpoint; plot; sample.
A NaN/Inf loss or gradient norm raises FloatingPointError without writing a checkpoint. SIGTERM
saves a checkpoint and returns.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import data as data_lib
from k2jax import distributed, optim, sharding
from k2jax.flops import flops_per_token
from k2jax.model import partitioning
from k2jax.model.counting import count_params
from k2jax.perf import matmul_peak_flops
from k2jax.train import config as config_lib
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.metrics import MetricsWriter, read_metrics, truncate_metrics
from k2jax.train.plot import plot_run
from k2jax.train.sample import sample_tokens
from k2jax.train.schedules import make_schedule
from k2jax.train.state import TrainState, init_state, state_shardings
from k2jax.train.step import make_eval_step, make_train_step


def build_optimizer(config, model_cfg, schedule, mesh=None):
  """config.optimizer -> the k2jax optax transform (QK-Clip only for muonclip).

  On a mesh that splits parameters (fsdp, expert or tensor > 1), Muon's Newton-Schulz runs
  sharded (Distributed Muon); on a data-parallel mesh the replicated matrices are batched.
  """
  o = config.optimizer
  splits = mesh is not None and any(mesh.shape[a] > 1 for a in ("fsdp", "expert", "tensor"))
  shardings = partitioning.variable_shardings(model_cfg, mesh)["params"] if splits else None
  if o.name == "muonclip":
    return optim.muonclip(schedule, weight_decay=o.weight_decay, qk_clip_tau=o.qk_clip_tau,
                          model_config=model_cfg, ns_dtype=jnp.dtype(o.ns_dtype),
                          param_shardings=shardings)
  if o.name == "muon":
    return optim.muon(schedule, weight_decay=o.weight_decay, ns_dtype=jnp.dtype(o.ns_dtype),
                      param_shardings=shardings)
  return optim.adamw(schedule, weight_decay=o.weight_decay)


def _check_workdir(workdir: str) -> pathlib.Path:
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise config_lib.ConfigError(f"workdir {workdir}: not writable ({e.strerror or e})") from e
  return path


class _Setup:
  """Everything train() builds before compiling."""

  def __init__(self, config, workdir: str):
    config_lib.validate(config)
    self.workdir = _check_workdir(workdir)
    t = config.train
    try:
      self.tokenizer = data_lib.build_tokenizer(config.data, str(self.workdir))
      self.train_iter = data_lib.make_iterator(config.data, self.tokenizer, "train",
                                               t.batch_size, t.seq_len, config.seed)
      self.eval_batches, self.bytes_per_token = [], float("nan")
      if t.eval_every:
        val_iter = data_lib.make_iterator(config.data, self.tokenizer, "validation",
                                          t.batch_size, t.seq_len, config.seed)
        self.eval_batches = [next(val_iter) for _ in range(t.eval_batches)]
        val_iter.close()
        self.bytes_per_token = data_lib.bytes_per_token(config.data, self.tokenizer)
    except (ValueError, OSError) as e:
      raise config_lib.ConfigError(str(e).splitlines()[0]) from e
    self.model_cfg = config_lib.model_config(config, self.tokenizer.vocab_size)
    sizes = config_lib.mesh_shape(config)
    self.num_devices = math.prod(sizes.values())
    self.mesh = sharding.make_mesh(sizes, jax.devices()[:self.num_devices])
    self.batch_sharding = sharding.batch_sharding(self.mesh)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch (every process reads all of it) as arrays over the mesh's devices."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        x.shape, self.batch_sharding, lambda index: x[index]), batch)


class _SigtermFlag:
  """Sets `.raised` on SIGTERM while active (main thread only; elsewhere it never fires)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ModelConfig fields that change numerics but not the shapes of the state a checkpoint holds.
_NUMERICS_FIELDS = ("dtype", "moe_dispatch", "capacity_factor", "moe_block_size", "remat",
                    "scan_layers")
RUN_FILE = "run.json"


def _check_same_run(workdir: pathlib.Path, config, cfg, write: bool) -> None:
  """A workdir resumes only the run it holds: same model shapes and optimizer."""
  now = {"optimizer": config.optimizer.name,
         **{k: v for k, v in cfg.to_dict().items() if k not in _NUMERICS_FIELDS}}
  path = workdir / RUN_FILE
  has_checkpoints = any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))
  if path.exists() and has_checkpoints:
    before = json.loads(path.read_text())
    diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if diff:
      k = diff[0]
      raise config_lib.ConfigError(
          f"workdir {workdir} holds a run with {k}={before.get(k)!r}, this config has "
          f"{now.get(k)!r} ({len(diff)} field(s) differ); use another workdir")
  if write:
    path.write_text(json.dumps(now, indent=2))


def _check_finite(step: int, m: dict, last_saved: int | None) -> None:
  for key in ("loss", "grad_norm"):
    if not math.isfinite(m[key]):
      where = f"step {last_saved}" if last_saved is not None else "none"
      raise FloatingPointError(f"step {step}: {key} is {m[key]}; stopping without saving "
                               f"(last good checkpoint: {where})")


def train(config, workdir: str) -> dict[str, Any]:
  """Trains config in workdir (resuming from its checkpoints); returns the final summary."""
  s = _Setup(config, workdir)
  t, cfg = config.train, s.model_cfg
  schedule = make_schedule(config.optimizer.schedule, config.optimizer.lr, t.steps,
                           config.optimizer.warmup_steps, config.optimizer.decay_fraction,
                           config.optimizer.final_lr_fraction)
  tx = build_optimizer(config, cfg, schedule, s.mesh)
  primary = distributed.is_primary()
  _check_same_run(s.workdir, config, cfg, write=primary)
  if primary:
    (s.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  with jax.set_mesh(s.mesh):
    state_sh = state_shardings(cfg, tx, s.mesh)
    state = init_state(cfg, tx, config.seed, shardings=state_sh)
    ckpt = Checkpointer(s.workdir / "checkpoints", config.checkpoint.keep,
                        config.checkpoint.async_save)
    restored = ckpt.restore_latest(state)
    start = 0
    if restored is not None:
      start, state, data_state = restored
      s.train_iter.set_state(data_state)
      if primary:
        truncate_metrics(s.workdir, start)
      print(f"resumed from {ckpt.directory / str(start)}", flush=True)
    last_saved = start if restored is not None else None

    counts = count_params(cfg)
    fpt = flops_per_token(cfg, t.seq_len)
    peak = matmul_peak_flops(jnp.dtype(cfg.dtype)) * s.num_devices
    print(f"k2jax: {config.model.preset} ({counts['total'] / 1e6:.2f}M params, "
          f"{counts['activated'] / 1e6:.2f}M activated), {config.optimizer.name}, "
          f"{t.steps} steps x {t.batch_size} x {t.seq_len} tokens, dtype {cfg.dtype}, "
          f"{s.num_devices} device(s), peak {peak / 1e12:.2f} TFLOP/s, "
          f"{fpt / 1e6:.1f} MFLOP/token", flush=True)

    train_step = make_train_step(
        cfg, tx, schedule, grad_accum=t.grad_accum, grad_clip=config.optimizer.grad_clip,
        bias_update_rate=config.router.bias_update_rate, bias_centered=config.router.centered,
        mesh=s.mesh, state_shardings=state_sh)
    eval_step = make_eval_step(cfg, s.mesh)
    writer = MetricsWriter(s.workdir, t.steps) if primary else None
    tokens_per_step = t.batch_size * t.seq_len
    summary: dict[str, Any] = {"start_step": start, "stopped": None}

    def evaluate(st: TrainState) -> dict[str, float]:
      losses = [eval_step(st.params, st.router, s.put_batch(b)) for b in s.eval_batches]
      loss = float(np.mean(jax.device_get(losses)))
      return {"eval_loss": loss,
              "eval_bits_per_byte": loss / math.log(2) / s.bytes_per_token}

    # The log window: its first step and start time. Eval and checkpoint time is left out by
    # moving the start forward by their duration.
    clock = {"step": start, "time": 0.0}

    def paused(fn, *args):
      t0 = time.perf_counter()
      out = fn(*args)
      clock["time"] += time.perf_counter() - t0
      return out

    def finish(step: int, metrics, extra: dict) -> None:
      """Fetches a step's metrics (waiting for it), checks them, logs at log/eval steps."""
      m = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
      m = {k: (v.item() if v.ndim == 0 else v) for k, v in m.items()}
      now = time.perf_counter()
      _check_finite(step, m, last_saved)
      if extra or step % t.log_every == 0 or step == t.steps:
        seconds = max(now - clock["time"], 1e-9)
        tps = (step - clock["step"]) * tokens_per_step / seconds
        if writer is not None:
          writer.write({"step": step, **m, "tokens_per_sec": tps, "mfu": fpt * tps / peak,
                        **extra})
        clock.update(step=step, time=time.perf_counter())

    try:
      with _SigtermFlag() as sigterm:
        compiled, pending = None, None  # pending: (step, metrics, extra) not yet fetched.
        for i in range(start, t.steps):
          step = i + 1
          batch = s.put_batch(next(s.train_iter))
          data_state = s.train_iter.get_state()
          if compiled is None:
            t0 = time.perf_counter()
            compiled = train_step.lower(state, batch).compile()
            print(f"compiled the train step in {time.perf_counter() - t0:.1f}s", flush=True)
            clock["time"] = time.perf_counter()
          state, metrics = compiled(state, batch)
          if pending is not None:  # one step late: step i runs while step i - 1 is read.
            finish(*pending)
          extra = {}
          if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            jax.block_until_ready(metrics)  # the step's own time stays in the window.
            extra = paused(evaluate, state)
          pending = (step, metrics, extra)
          every = config.checkpoint.every_steps
          if step == t.steps or sigterm.raised or (every and step % every == 0):
            finish(*pending)  # a state is written only after its step's metrics are checked.
            pending = None
            if paused(ckpt.save, step, state, data_state):
              last_saved = step
          if sigterm.raised:
            summary["stopped"] = f"SIGTERM at step {step}"
            print(f"SIGTERM: saved step {step}, exiting", flush=True)
            break
        if pending is not None:
          finish(*pending)
    finally:
      ckpt.wait()
      ckpt.close()
      if writer is not None:
        writer.close()
      s.train_iter.close()

    summary["step"] = int(state.step)
    if not primary:  # metrics, plot and sample are process 0's.
      return summary
    records = read_metrics(s.workdir)
    summary.update(plot=str(plot_run(
        s.workdir, config.optimizer.qk_clip_tau if config.optimizer.name == "muonclip" else None)))
    summary.update({k: records[-1][k] for k in ("loss", "eval_loss", "eval_bits_per_byte")
                    if records and k in records[-1]})
    _print_trajectory(records)
    if jax.process_count() > 1 and config.sample.num_tokens:
      print("sample: skipped in a multi-process run (sample from the checkpoint with "
            "experiments/generate.py)", flush=True)
    elif config.sample.num_tokens and summary["stopped"] is None:
      ids = sample_tokens(cfg, {"params": state.params, "router": state.router},
                          s.tokenizer.encode(config.sample.prompt), config.sample.num_tokens,
                          config.sample.temperature, state.rng, s.tokenizer.vocab_size)
      summary["sample"] = config.sample.prompt + s.tokenizer.decode(ids)
      print(f"--- sample ---\n{summary['sample']}\n--------------", flush=True)
  return summary


def _print_trajectory(records: list[dict], rows: int = 8) -> None:
  """A short table of the run: loss, max logit, clipped heads and eval bits per byte."""
  train_rows = [r for r in records if "loss" in r]
  if not train_rows:
    return
  picks = sorted({train_rows[round(j * (len(train_rows) - 1) / max(rows - 1, 1))]["step"]
                  for j in range(rows)} | {r["step"] for r in records if "eval_loss" in r})
  by_step = {r["step"]: r for r in records}
  print(f"{'step':>7} {'loss':>8} {'max_logit':>10} {'clipped':>8} {'eval_bpb':>9}")
  for step in picks:
    r = by_step[step]
    bpb = f"{r['eval_bits_per_byte']:.3f}" if "eval_bits_per_byte" in r else ""
    print(f"{step:>7} {r['loss']:>8.4f} {r['max_logit']:>10.2f} {r['clipped_heads']:>8} {bpb:>9}")
