r"""Compile a train config's real sharded train step (and serving) for a TPU slice, on this host.

  python experiments/aot.py --config=experiments/configs/k2_nano.py --topology=v5p:2x2x1 \
      --config.mesh.data=1 --config.mesh.fsdp=2 --config.mesh.expert=2
  python experiments/aot.py --config=experiments/configs/k2_nano.py --topology=v5p:8x8x8 \
      --config.model.preset=kimi_k2 --config.model.remat=full --config.model.dtype=bfloat16 \
      --config.model.moe_dispatch=capacity --config.train.seq_len=4096 \
      --config.train.batch_size=512 --config.mesh.data=1 --config.mesh.fsdp=8 \
      --config.mesh.expert=64 --early --out=k2_v5p512.json

--early reports at buffer assignment (under a minute for Kimi K2) instead of waiting for TPU
code generation (over an hour and more than 15 GB of host memory for K2 on this machine).

Nothing is allocated and nothing runs: libtpu's compile-only devices stand in for the slice
(`k2jax.aot`). Prints, and writes as JSON to --out, per chip: memory against HBM (or a "does not
fit" line with the compiler's reason), compiled FLOPs against `k2jax.flops_per_token` x tokens,
collective bytes by kind, and step-time, tokens/s and MFU ESTIMATES (roofline of the compiled
program; no hardware is measured). The mesh is config.mesh over the slice's chips (one axis may
be -1). The model is the preset's with config.model's overrides and the preset's vocabulary
(training would round the tokenizer's). Serving (--programs prefill, decode) uses the same model
and mesh with a compressed MLA cache of --serve_batch rows x --serve_context positions.
"""

import json
import os
import sys

# The host only compiles: its own jax backend is the CPU (libtpu would otherwise look for a TPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from k2jax import aot, presets  # noqa: E402
from k2jax.train.aot import train_step_report  # noqa: E402
from k2jax.train.config import loss_weights  # noqa: E402
from k2jax.train.optimizer import build_optimizer  # noqa: E402

PROGRAMS = ("train", "prefill", "decode")
_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/k2_nano.py",
                                          "Experiment config file (ml_collections).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1",
                                "TPU slice: <generation>:<shape> (v5p:8x8x8) or a named slice "
                                "(v5p-1024).")
_PROGRAMS = flags.DEFINE_list("programs", ["train"], f"Any of {', '.join(PROGRAMS)}.")
_SERVE_BATCH = flags.DEFINE_integer("serve_batch", 1, "Serving: rows of the cache.")
_SERVE_CONTEXT = flags.DEFINE_integer("serve_context", 131072,
                                      "Serving: cache positions per row.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 4096, "Serving: prefill tokens per row.")
_OUT = flags.DEFINE_string("out", None, "Write the reports here as JSON.")
_EARLY = flags.DEFINE_bool("early", False,
                           "Report at buffer assignment, from the compiler's dumps, and skip TPU "
                           "code generation (most of a K2-size compile's time and host memory).")


def _model_config(config):
  overrides = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
  return presets.get(config.model.preset, **overrides)


def run(config, topology: str, programs, serve_batch: int, serve_context: int,
        prompt_len: int, early: bool = False) -> list[aot.Report]:
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise ValueError(f"--programs: unknown {unknown[0]!r} (choose from {', '.join(PROGRAMS)})")
  devices, chip = aot.topology(topology)
  mesh = aot.topology_mesh(dict(config.mesh), devices, topology)
  cfg = _model_config(config)
  reports = []
  if "train" in programs:
    t, o = config.train, config.optimizer
    tx, _ = build_optimizer(config, cfg, mesh)
    reports.append(train_step_report(
        cfg, tx, mesh, chip, topology, batch_size=t.batch_size, seq_len=t.seq_len,
        muon=o.name != "adamw", loss_weights=loss_weights(config), grad_accum=t.grad_accum,
        grad_clip=o.grad_clip, bias_update_rate=config.router.bias_update_rate,
        bias_centered=config.router.centered, early=early))
    print(reports[-1].format(), flush=True)
  if "prefill" in programs:
    reports.append(aot.prefill_report(cfg, mesh, chip, topology, batch=serve_batch,
                                      prompt_len=prompt_len, context=serve_context, early=early))
    print(reports[-1].format(), flush=True)
  if "decode" in programs:
    reports.append(aot.decode_report(cfg, mesh, chip, topology, batch=serve_batch,
                                     context=serve_context, early=early))
    print(reports[-1].format(), flush=True)
  return reports


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    reports = run(_CONFIG.value, _TOPOLOGY.value, _PROGRAMS.value, _SERVE_BATCH.value,
                  _SERVE_CONTEXT.value, _PROMPT_LEN.value, _EARLY.value)
  except ValueError as e:
    sys.exit(f"error: {str(e).splitlines()[0]}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump([r.to_dict() for r in reports], f, indent=1)
  if _EARLY.value:
    sys.stdout.flush()
    os._exit(0)  # drops the compiles still generating code in their threads.


if __name__ == "__main__":
  app.run(main)
