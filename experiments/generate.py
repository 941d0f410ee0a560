"""Generate text from a training workdir or a Hugging Face directory (compressed MLA cache).

  python experiments/generate.py --workdir=workdirs/k2_nano --prompt="def "
  python experiments/generate.py --hf_dir=exports/k2_nano --prompt="def " --temperature=0.8
  python experiments/generate.py --workdir=workdirs/k2_nano_mtp --prompt="def " --speculative=mtp

The tokenizer is the run's (a workdir) or the HF directory's (`k2jax.hf.load_tokenizer`);
`--prompt_ids=1,2,3` bypasses it. Generation stops at the tokenizer's
end-of-text (a workdir) or the config's eos_token_id (an HF directory). For K2's chat format and
tool calls, use experiments/chat.py.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

import k2jax.hf
from k2jax.decode import generate
from k2jax.train.workdir import load_latest

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text.")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt token ids (instead of --prompt).")
_NUM = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_bool("stop", True, "Stop at the end-of-text token.")
_SPECULATIVE = flags.DEFINE_enum("speculative", None, ["mtp"],
                                 "Draft with the model's MTP layer (greedy only).")


def run() -> str:
  if (_WORKDIR.value is None) == (_HF_DIR.value is None):
    raise ValueError("give exactly one of --workdir and --hf_dir")
  if _WORKDIR.value is not None:
    cfg, variables, tok, _ = load_latest(_WORKDIR.value)
    encode, decode, vocab, stop = tok.encode, tok.decode, tok.vocab_size, [tok.eos_id]
  else:
    path = pathlib.Path(_HF_DIR.value)
    cfg, variables = k2jax.hf.load(path)
    tok = k2jax.hf.load_tokenizer(path)
    if tok is None and _PROMPT_IDS.value is None:
      raise ValueError(f"{path}: no tokenizer files; pass --prompt_ids")
    encode, decode, vocab = ((tok.encode, tok.decode, tok.vocab_size) if tok is not None
                             else (None, None, cfg.vocab_size))
    eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    stop = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  vocab = min(vocab, cfg.vocab_size)
  ids = ([int(i) for i in _PROMPT_IDS.value] if _PROMPT_IDS.value is not None
         else encode(_PROMPT.value))
  new = generate(cfg, variables, [ids], _NUM.value, temperature=_TEMPERATURE.value,
                 top_p=_TOP_P.value, seed=_SEED.value, stop_tokens=stop if _STOP.value else (),
                 valid_vocab=vocab, speculative=_SPECULATIVE.value).tokens[0]
  if decode is None:
    return " ".join(map(str, ids + new))
  return decode(ids) + decode(new)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    print(run())
  except ValueError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
