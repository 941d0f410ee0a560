"""`train(config, workdir)`: one experiment end to end, in three parts.

- `Run(config, workdir)` (setup): validates the config, the workdir, the data and the tokenizer
  (one-line ConfigError before anything compiles), builds the model, optimizer, mesh and state,
  and resumes from the latest valid checkpoint; without one, starts from config.init_from's
  weights (fresh optimizer state, step 0) when it is set. data.format picks the pipeline: text
  (k2jax.data), chat (k2jax.train.chat_data) or copy (k2jax.data.copying); only text evaluation
  reports bits per byte.
- `run.loop()`: trains with metrics read one step late; evaluates, logs, checkpoints. A NaN/Inf
  loss or gradient norm raises FloatingPointError without writing a checkpoint; SIGTERM saves a
  checkpoint and returns.
- `run.report()`: the plot, the trajectory table and a sample from the cached decoder.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import data as data_lib
from k2jax import decode, distributed, sharding
from k2jax.data import copying, sources
from k2jax.flops import flops_per_token
from k2jax.model.counting import count_params
from k2jax.perf import cached_matmul_peak_flops
from k2jax.train import chat_data
from k2jax.train import config as config_lib
from k2jax.train import workdir as workdir_lib
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.metrics import MetricsWriter, read_metrics, truncate_metrics
from k2jax.train.optimizer import build_optimizer
from k2jax.train.plot import plot_run
from k2jax.train.state import TrainState, init_state, state_shardings
from k2jax.train.step import make_eval_step, make_train_step


def train(config, workdir: str) -> dict[str, Any]:
  """Trains config in workdir (resuming from its checkpoints); returns the final summary."""
  return execute(Run(config, workdir))


def execute(run: Run) -> dict[str, Any]:
  """Runs a set-up run's loop on its mesh, closes it, and returns its report."""
  with jax.set_mesh(run.mesh):
    try:
      run.loop()
    finally:
      run.close()
    return run.report()


class Run:
  """What a training run builds before its loop, and the loop's state (setup). A subclass with
  another kind of config (e.g. k2jax.rl's) sets `validate` to its own check."""

  validate = staticmethod(config_lib.validate)

  def __init__(self, config, workdir: str):
    self.validate(config)
    self.config, t = config, config.train
    self.workdir = workdir_lib.check_writable(workdir)
    self.primary = distributed.is_primary()
    try:
      self.tokenizer = workdir_lib.run_tokenizer(self.workdir, config, write=self.primary)
      data_format = sources.field(config.data, "format")
      text = data_format == "text"
      make_iterator = {"text": data_lib.make_iterator, "chat": chat_data.make_iterator,
                       "copy": copying.make_iterator}[data_format]
      self.train_iter = make_iterator(config.data, self.tokenizer, "train", t.batch_size,
                                      t.seq_len, config.seed)
      self.eval_batches, self.bytes_per_token = [], None
      if t.eval_every:
        val_iter = make_iterator(config.data, self.tokenizer, "validation", t.batch_size,
                                 t.seq_len, config.seed)
        self.eval_batches = [next(val_iter) for _ in range(t.eval_batches)]
        val_iter.close()
        if text:
          self.bytes_per_token = data_lib.bytes_per_token(config.data, self.tokenizer)
    except (ValueError, OSError) as e:
      raise config_lib.ConfigError(str(e).splitlines()[0]) from e
    self.cfg = config_lib.model_config(config, self.tokenizer.vocab_size)
    sizes = config_lib.mesh_shape(config)
    self.num_devices = math.prod(sizes.values())
    self.mesh = sharding.make_mesh(sizes, jax.devices()[:self.num_devices])
    self.tx, self.schedule = build_optimizer(config, self.cfg, self.mesh)
    workdir_lib.check_same_run(self.workdir, config, self.cfg, write=self.primary)
    if self.primary:
      (self.workdir / workdir_lib.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))

    with jax.set_mesh(self.mesh):
      self.state_sh = state_shardings(self.cfg, self.tx, self.mesh)
      abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          jax.eval_shape(lambda: init_state(self.cfg, self.tx, config.seed)), self.state_sh)
    self.ckpt = Checkpointer(self.workdir / workdir_lib.CHECKPOINT_DIR, config.checkpoint.keep,
                             config.checkpoint.async_save)
    self.start, self.last_saved = 0, None
    restored = self.ckpt.restore_latest(abstract)
    if restored is not None:
      self.start, self.state, data_state = restored
      self.last_saved = self.start
      self.train_iter.set_state(data_state)
      if self.primary:
        truncate_metrics(self.workdir, self.start)
      print(f"resumed from {self.ckpt.directory / str(self.start)}", flush=True)
    else:
      variables = None
      if config.init_from:
        try:
          variables = workdir_lib.load_init(config.init_from, self.cfg)
        except (ValueError, OSError) as e:
          raise config_lib.ConfigError(str(e).splitlines()[0]) from e
        print(f"initialised from {config.init_from} (fresh optimizer state)", flush=True)
      with jax.set_mesh(self.mesh):
        self.state = init_state(self.cfg, self.tx, config.seed, shardings=self.state_sh,
                                variables=variables)
    self.stopped = None
    self.writer = MetricsWriter(self.workdir, t.steps) if self.primary else None
    self._print_header()

  def _print_header(self) -> None:
    config, t, cfg = self.config, self.config.train, self.cfg
    counts = count_params(cfg)
    self.flops_per_token = flops_per_token(cfg, t.seq_len)
    self.peak = cached_matmul_peak_flops(jnp.dtype(cfg.dtype)) * self.num_devices
    mtp = f" + {counts['mtp'] / 1e6:.2f}M in MTP layers" if counts["mtp"] else ""
    print(f"k2jax: {config.model.preset} ({counts['total'] / 1e6:.2f}M params{mtp}, "
          f"{counts['activated'] / 1e6:.2f}M activated), {config.optimizer.name}, "
          f"{t.steps} steps x {t.batch_size} x {t.seq_len} tokens, dtype {cfg.dtype}, "
          f"{self.num_devices} device(s), peak {self.peak / 1e12:.2f} TFLOP/s, "
          f"{self.flops_per_token / 1e6:.1f} MFLOP/token", flush=True)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch (every process reads all of it) as arrays over the mesh's devices."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        x.shape, batch_sharding, lambda index: x[index]), batch)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """eval_<term> means over the eval batches; eval_loss their weighted sum; bits per byte."""
    values = [self.eval_step(state.params, state.router, self.put_batch(b), state.step)
              for b in self.eval_batches]
    out = {f"eval_{k}": float(np.mean([v[k] for v in jax.device_get(values)]))
           for k in values[0]}
    if "eval_cross_entropy" in out and self.bytes_per_token is not None:
      out["eval_bits_per_byte"] = out["eval_cross_entropy"] / math.log(2) / self.bytes_per_token
    return out

  def loop(self) -> None:
    """Trains from self.start to config.train.steps (see the module docstring)."""
    config, t = self.config, self.config.train
    weights = config_lib.loss_weights(config)
    train_step = make_train_step(
        self.cfg, self.tx, self.schedule, loss_weights=weights, grad_accum=t.grad_accum,
        grad_clip=config.optimizer.grad_clip, bias_update_rate=config.router.bias_update_rate,
        bias_centered=config.router.centered, mesh=self.mesh, state_shardings=self.state_sh)
    self.eval_step = make_eval_step(self.cfg, weights, mesh=self.mesh)
    log = _Log(self, t.batch_size * t.seq_len)
    every = config.checkpoint.every_steps
    with SigtermFlag() as sigterm:
      compiled, pending = None, None  # pending: (step, metrics, extra) not yet fetched.
      for step in range(self.start + 1, t.steps + 1):
        batch = self.put_batch(next(self.train_iter))
        data_state = self.train_iter.get_state()
        if compiled is None:
          compiled = log.timed_compile(train_step, self.state, batch)
        self.state, metrics = compiled(self.state, batch)
        if pending is not None:  # one step late: step i runs while step i - 1 is read.
          log.finish(*pending)
        extra = {}
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
          jax.block_until_ready(metrics)  # the step's own time stays in the window.
          extra = log.paused(self.evaluate, self.state)
        pending = (step, metrics, extra)
        if step == t.steps or sigterm.raised or (every and step % every == 0):
          log.finish(*pending)  # a state is written only after its step's metrics are checked.
          pending = None
          if log.paused(self.ckpt.save, step, self.state, data_state):
            self.last_saved = step
        if sigterm.raised:
          self.stopped = f"SIGTERM at step {step}"
          print(f"SIGTERM: saved step {step}, exiting", flush=True)
          break
      if pending is not None:
        log.finish(*pending)

  def close(self) -> None:
    self.ckpt.wait()
    self.ckpt.close()
    if self.writer is not None:
      self.writer.close()
    self.train_iter.close()

  def report(self) -> dict[str, Any]:
    """The summary; on the primary process also the plot, the trajectory and a sample."""
    config = self.config
    summary = {"start_step": self.start, "stopped": self.stopped, "step": int(self.state.step)}
    if not self.primary:  # metrics, plot and sample are process 0's.
      return summary
    records = read_metrics(self.workdir)
    tau = config.optimizer.qk_clip_tau if config.optimizer.name == "muonclip" else None
    summary["plot"] = str(plot_run(self.workdir, tau))
    summary.update({k: records[-1][k] for k in ("loss", "eval_loss", "eval_bits_per_byte")
                    if records and k in records[-1]})
    _print_trajectory(records)
    if jax.process_count() > 1 and config.sample.num_tokens:
      print("sample: skipped in a multi-process run (sample from the checkpoint with "
            "experiments/generate.py)", flush=True)
    elif config.sample.num_tokens and self.stopped is None:
      out = decode.generate(self.cfg, {"params": self.state.params, "router": self.state.router},
                            [self.tokenizer.encode(config.sample.prompt)],
                            config.sample.num_tokens, temperature=config.sample.temperature,
                            seed=config.seed, valid_vocab=self.tokenizer.vocab_size)
      summary["sample"] = config.sample.prompt + self.tokenizer.decode(out.tokens[0])
      print(f"--- sample ---\n{summary['sample']}\n--------------", flush=True)
    return summary


class _Log:
  """Reads a step's metrics, checks them, writes them at log and eval steps with throughput over
  the log window (from its first step and start time; eval, checkpoint and compile time is left
  out by moving the start forward by their duration)."""

  def __init__(self, run: Run, tokens_per_step: int):
    self.run, self.tokens_per_step = run, tokens_per_step
    self.step, self.time = run.start, time.perf_counter()

  def paused(self, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    self.time += time.perf_counter() - t0
    return out

  def timed_compile(self, step_fn, state, batch):
    t0 = time.perf_counter()
    compiled = self.paused(lambda: step_fn.lower(state, batch).compile())
    print(f"compiled the train step in {time.perf_counter() - t0:.1f}s", flush=True)
    return compiled

  def finish(self, step: int, metrics, extra: dict) -> None:
    run, t = self.run, self.run.config.train
    m = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    m = {k: (v.item() if v.ndim == 0 else v) for k, v in m.items()}
    now = time.perf_counter()
    for key in ("loss", "grad_norm"):
      if not math.isfinite(m[key]):
        where = f"step {run.last_saved}" if run.last_saved is not None else "none"
        raise FloatingPointError(f"step {step}: {key} is {m[key]}; stopping without saving "
                                 f"(last good checkpoint: {where})")
    if extra or step % t.log_every == 0 or step == t.steps:
      tps = (step - self.step) * self.tokens_per_step / max(now - self.time, 1e-9)
      if run.writer is not None:
        run.writer.write({"step": step, **m, "tokens_per_sec": tps,
                          "mfu": run.flops_per_token * tps / run.peak, **extra})
      self.step, self.time = step, time.perf_counter()


class SigtermFlag:
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
