"""Export a training workdir's latest checkpoint as a Hugging Face directory.

  python experiments/export_hf.py --workdir=workdirs/k2_nano --out=exports/k2_nano

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and `k2jax.hf.load`.
It also holds the run's tokenizer: a K2-format one's files (tiktoken.model, tokenizer_config.json,
chat_template.jinja: `k2jax.hf.load_tokenizer`), and `k2jax_data.json`, the run's data config
(experiments/generate.py rebuilds a byte tokenizer from it).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

import k2jax.hf
from k2jax import data as data_lib
from k2jax.train import build_optimizer, init_state, make_schedule, model_config
from k2jax.train.checkpoint import Checkpointer

DATA_FILE = "k2jax_data.json"

def load_workdir(workdir: str | pathlib.Path):
  """(model config, variables {"params", "router"}, tokenizer, run config) of the latest
  checkpoint of a training run."""
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise ValueError(f"{path}: not found (is {workdir} a training workdir?)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  tokenizer = data_lib.build_tokenizer(config.data, str(workdir))
  cfg = model_config(config, tokenizer.vocab_size)
  o = config.optimizer
  schedule = make_schedule(o.schedule, o.lr, config.train.steps, o.warmup_steps,
                           o.decay_fraction, o.final_lr_fraction)
  tx = build_optimizer(config, cfg, schedule)
  target = jax.eval_shape(lambda: init_state(cfg, tx, config.seed))
  ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=False)
  try:
    restored = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"{workdir / 'checkpoints'}: no loadable checkpoint")
  step, state, _ = restored
  print(f"restored step {step} of {workdir}", flush=True)
  return cfg, {"params": state.params, "router": state.router}, tokenizer, config


def export(workdir: str, out: str, dtype: str | None = None, max_shard_size: str = "5GB",
           hub_names: bool = False) -> pathlib.Path:
  cfg, variables, tokenizer, config = load_workdir(workdir)
  if dtype is not None and dtype != cfg.param_dtype:
    cfg = cfg.replace(param_dtype=dtype)
    variables = {**variables, "params": jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)),
                                                     variables["params"])}
  out = pathlib.Path(out)
  kimi = isinstance(tokenizer, data_lib.KimiTokenizer)
  k2jax.hf.save(out, cfg, jax.device_get(variables), max_shard_size=max_shard_size,
                hub_names=hub_names, tokenizer=tokenizer if kimi else None,
                hf_config=None if kimi else {"bos_token_id": None,
                                             "eos_token_id": tokenizer.eos_id})
  (out / DATA_FILE).write_text(config.data.to_json_best_effort(indent=2))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    out = export(f.workdir, f.out, f.dtype, f.max_shard_size, f.hub_names)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {out}")


if __name__ == "__main__":  # flags only here: experiments/generate.py imports load_workdir.
  flags.DEFINE_string("workdir", None, "Training run directory (config, checkpoints).")
  flags.DEFINE_string("out", None, "Output directory for the Hugging Face checkpoint.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Parameter dtype to write (default: the run's).")
  flags.DEFINE_string("max_shard_size", "5GB", "Shard the safetensors above this size.")
  flags.DEFINE_bool("hub_names", False, "Write routed experts one by one, as hub checkpoints do.")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
