"""Evaluate models as agents in k2jax.agentic's held-out tool worlds.

  python experiments/agent_eval.py --workdir=workdirs/sft_demo/sft
  python experiments/agent_eval.py --workdir=workdirs/sft_demo/pretrain \
      --workdir=workdirs/sft_demo/sft --out=workdirs/sft_demo/eval      # before / after
  python experiments/agent_eval.py --checkpoint=exports/k2_nano_sft   # a Hugging Face directory

Each model (the latest checkpoint of a training workdir, or a Hugging Face directory with its
K2-format tokenizer) plays `--heldout` tasks of the seen domains (other worlds and tool sets than
training) and `--heldout_domain` tasks of the domain training never saw, through
`k2jax.agentic.run_episodes` (greedy by default). Printed: per split and domain the success rate,
the valid tool-call rate (calls that parse, name a declared tool and satisfy its schema), mean
turns, failures and bad calls by kind; a few transcripts; then one row per model. With --out:
eval.json (every summary, the transcripts) and success_by_domain.png.
"""

import functools
import json
import pathlib
import sys

from absl import app, flags, logging

import k2jax.hf
from k2jax import agentic, decode
from k2jax.agentic import evaluate
from k2jax.train.workdir import load_latest

_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "Training workdir(s) to evaluate.")
_CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", [], "Hugging Face directories.")
_HELDOUT = flags.DEFINE_integer("heldout", 240, "Held-out tasks of the seen domains.")
_HELDOUT_DOMAIN = flags.DEFINE_integer("heldout_domain", 60, "Tasks of the held-out domain.")
_SEED = flags.DEFINE_integer("seed", 0, "Task seed.")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 6, "Replies per episode.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "Tokens per reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Episodes played together.")
_TRANSCRIPTS = flags.DEFINE_integer("transcripts", 3, "Transcripts printed per model.")
_OUT = flags.DEFINE_string("out", None, "Directory for eval.json and success_by_domain.png.")


def load(path: str, workdir: bool):
  """(generate function, tokenizer, context length) of a workdir or a Hugging Face directory."""
  if workdir:
    cfg, variables, tok, _ = load_latest(path)
  else:
    tok = k2jax.hf.load_tokenizer(path)
    if tok is None:
      raise ValueError(f"{path}: no tiktoken.model (a K2-format tokenizer is needed)")
    cfg, variables = k2jax.hf.load(path)
  if "<|im_end|>" not in getattr(tok, "special_ids", {}):
    raise ValueError(f"{path}: its tokenizer ({tok.name}) has no K2 chat tokens")
  return functools.partial(decode.generate, cfg, variables), tok, cfg.max_position_embeddings


def evaluate_model(path: str, workdir: bool) -> tuple[dict, list[str]]:
  """({split: summary}, transcripts) of one model."""
  generate, tok, context = load(path, workdir)
  sampling = agentic.Sampling(_MAX_NEW.value, _TEMPERATURE.value, seed=_SEED.value)
  summaries, transcripts = {}, []
  for split, n in (("heldout", _HELDOUT.value), ("heldout_domain", _HELDOUT_DOMAIN.value)):
    if not n:
      continue
    episodes = agentic.run_episodes(generate, tok, agentic.make_tasks(split, n, _SEED.value),
                                    _MAX_TURNS.value, sampling, batch_size=_BATCH.value,
                                    max_tokens=context)
    summaries[split] = evaluate.summarize(episodes)
    transcripts += [evaluate.transcript(e) for e in episodes[:_TRANSCRIPTS.value]]
  return summaries, transcripts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO.
  models = [(p, True) for p in _WORKDIRS.value] + [(p, False) for p in _CHECKPOINTS.value]
  if not models:
    sys.exit("error: give --workdir or --checkpoint (each may repeat)")
  results, transcripts = {}, {}
  for path, workdir in models:
    try:
      results[path], transcripts[path] = evaluate_model(path, workdir)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(f"\n=== {path}\n{evaluate.domain_table(results[path])}\n")
    print("\n\n".join(transcripts[path]), flush=True)
  print(f"\n{evaluate.comparison_table(results)}", flush=True)
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    settings = {f: flags.FLAGS[f].value for f in ("heldout", "heldout_domain", "seed", "max_turns",
                                                  "max_new_tokens", "temperature")}
    (out / "eval.json").write_text(json.dumps(
      {"settings": settings, "results": results, "transcripts": transcripts}, indent=2))
    png = evaluate.plot_success(results, out / "success_by_domain.png")
    print(f"wrote {out / 'eval.json'} and {png}")


if __name__ == "__main__":
  app.run(main)
