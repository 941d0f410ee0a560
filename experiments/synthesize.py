"""Synthesise agentic SFT data: the scripted expert's conversations in k2jax.agentic's tool worlds,
as JSONL, and a K2-format BPE tokenizer for them.

  python experiments/synthesize.py --out=workdirs/sft_demo/data --train=20000 \
      [--heldout=500 --heldout_domain=100] [--tokenizer_vocab=2048]

Writes <out>/<split>.jsonl for each split asked for (only conversations the rubric accepts; tasks
`make_tasks(split, n, --seed)`), one {"messages", "tools", "task_id", "domain", "kind", "split"}
record per line: what `config.data.format = "chat"` trains on. With --tokenizer_vocab, also
<out>/tokenizer/: a K2-format byte-level BPE (k2jax.data.train_bpe, K2's special tokens and chat
template) trained on a sample of --tokenizer_corpus (a data.source: files, a glob or
python_stdlib) plus the rendered training conversations, so that a model pretrained on the corpus
with it reads conversations in few tokens. An existing tokenizer is kept (a model may depend on
it); the JSONL files are rewritten (they are deterministic).
"""

import itertools
import pathlib
import sys

from absl import app, flags

from k2jax import agentic, chat, data
from k2jax.data import tokenizers

_OUT = flags.DEFINE_string("out", None, "Output directory.")
_TRAIN = flags.DEFINE_integer("train", 20000, "Training tasks (0: none).")
_HELDOUT = flags.DEFINE_integer("heldout", 0, "Held-out tasks of the seen domains (0: none).")
_HELDOUT_DOMAIN = flags.DEFINE_integer("heldout_domain", 0, "Tasks of the held-out domain.")
_SEED = flags.DEFINE_integer("seed", 0, "Task seed.")
_VOCAB = flags.DEFINE_integer("tokenizer_vocab", 0, "Train a K2-format BPE of this many ids.")
_CORPUS = flags.DEFINE_string("tokenizer_corpus", "python_stdlib",
                              "Text the BPE is trained on besides the conversations (data.source).")
_TOKENIZER_BYTES = flags.DEFINE_integer("tokenizer_corpus_bytes", 4_000_000,
                                        "Bytes of the corpus the BPE is trained on.")
_TOKENIZER_CONVERSATIONS = flags.DEFINE_integer("tokenizer_conversations", 4000,
                                                "Training conversations the BPE is trained on.")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = pathlib.Path(_OUT.value)
  for split, n in (("train", _TRAIN.value), ("heldout", _HELDOUT.value),
                   ("heldout_domain", _HELDOUT_DOMAIN.value)):
    if n:
      counts = agentic.write_jsonl(str(out / f"{split}.jsonl"),
                                   agentic.make_tasks(split, n, _SEED.value))
      print(f"{out / f'{split}.jsonl'}: {counts['written']} conversations "
            f"({counts['dropped']} failed the rubric)", flush=True)
  if not _VOCAB.value:
    return
  path = out / tokenizers.BPE_DIR
  if (path / tokenizers.MODEL_FILE).exists():
    print(f"{path}: kept", flush=True)
    return
  if not _TRAIN.value:
    sys.exit("error: --tokenizer_vocab needs training conversations (--train > 0)")
  corpus = data.default_data_config()
  corpus.update(dict(source=_CORPUS.value, bpe_train_bytes=_TOKENIZER_BYTES.value))
  conversations = (chat.render(r["messages"], r["tools"]) for r in itertools.islice(
    agentic.read_jsonl(str(out / "train.jsonl")), _TOKENIZER_CONVERSATIONS.value))
  try:
    tok = data.train_bpe(itertools.chain(tokenizers.training_sample(corpus), conversations),
                         _VOCAB.value, tokenizers.k2_chat_template())
  except ValueError as e:
    sys.exit(f"error: {e}")
  tok.save(path)
  print(f"{path}: a K2-format BPE of {tok.vocab_size} ids", flush=True)


if __name__ == "__main__":
  app.run(main)
