"""Export a training workdir's latest checkpoint as a Hugging Face directory.

  python experiments/export_hf.py --workdir=workdirs/k2_nano --out=exports/k2_nano

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and `k2jax.hf.load`.
It also holds the run's tokenizer (`k2jax.hf.load_tokenizer` reads it back): a K2-format one's files
(tiktoken.model, tokenizer_config.json, chat_template.jinja) or a byte-level run's marker.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

import k2jax.hf
from k2jax.train.workdir import load_latest


def export(workdir: str, out: str, dtype: str | None = None, max_shard_size: str = "5GB",
           hub_names: bool = False) -> pathlib.Path:
  cfg, variables, tokenizer, _ = load_latest(workdir)
  if dtype is not None and dtype != cfg.param_dtype:
    cfg = cfg.replace(param_dtype=dtype)
    variables = {**variables, "params": jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)),
                                                     variables["params"])}
  out = pathlib.Path(out)
  k2jax.hf.save(out, cfg, jax.device_get(variables), max_shard_size=max_shard_size,
                hub_names=hub_names, tokenizer=tokenizer)
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


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run directory (config, checkpoints).")
  flags.DEFINE_string("out", None, "Output directory for the Hugging Face checkpoint.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Parameter dtype to write (default: the run's).")
  flags.DEFINE_string("max_shard_size", "5GB", "Shard the safetensors above this size.")
  flags.DEFINE_bool("hub_names", False, "Write routed experts one by one, as hub checkpoints do.")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
