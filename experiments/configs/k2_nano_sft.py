r"""Agentic SFT in miniature: k2_nano with dense FFNs (MODEL below), pretrained to copy by content,

  python experiments/train.py --config=experiments/configs/k2_nano_sft.py:pretrain \
      --workdir=workdirs/sft_demo/pretrain
  python experiments/train.py --config=experiments/configs/k2_nano_sft.py \
      --workdir=workdirs/sft_demo/sft

then fine-tuned with MuonClip on the synthesised tool-use conversations of k2jax.agentic. Before
them, `python experiments/synthesize.py --out=workdirs/sft_demo/data --train=20000
--tokenizer_vocab=2048` writes the conversations and the tokenizer; after them, `python
experiments/agent_eval.py --workdir=workdirs/sft_demo/pretrain --workdir=workdirs/sft_demo/sft
--out=workdirs/sft_demo/eval` plays both as agents. `make sft-demo` runs all four.

`:pretrain` is the base model: 2,000 steps on data.format "copy" (k2jax.data.copying: random
spans of the K2-format BPE's ids, each written twice, the loss on the copies), which forms the
induction circuit a language model pretrained at scale arrives with, and which SFT needs to copy
names and values from requests and tool results into calls and answers (REPORT.md, "Why values
were not copied"); the tokenizer is the one synthesize.py trained. At this width (128) and
learning rate (3e-3) the circuit forms in about 1,300 updates; at width 256 or lr 1e-2 it had
not formed after 800, even on 64 ids. The default (`:sft`) starts from its
latest checkpoint (config.init_from: weights and tokenizer; a fresh optimizer) and trains on
data/train.jsonl: the cross-entropy on the assistant's tokens only, whole conversations packed
into rows with segment ids; eval_loss is that masked loss on held-out conversations. Both phases
share the model section (init_from requires the same shapes: a config starting from these
checkpoints, such as k2_nano_rl.py, applies MODEL too). The result is in
experiments/REPORT.md, "Agentic SFT".
"""

from k2jax.train import default_config

DATA = "workdirs/sft_demo/data"
PHASES = ("pretrain", "sft")
# k2_nano with dense FFNs in all 4 layers (MLA attention kept): on 2 CPU cores it trains faster per
# token than k2_nano's 16-expert MoE layers (see REPORT.md, "Agentic SFT").
MODEL = dict(hidden_size=128, intermediate_size=384, first_k_dense_replace=4)


def get_config(phase: str = "sft"):
  if phase not in PHASES:
    raise ValueError(f"k2_nano_sft.py: phase must be one of {PHASES}, got {phase!r}")
  c = default_config()
  c.model.preset = "k2_nano"
  c.model.dtype = "bfloat16"
  c.model.update(MODEL)
  c.optimizer.name = "muonclip"
  c.train.log_every = 20
  c.sample.num_tokens = 0
  if phase == "pretrain":
    c.model.dtype = "float32"
    c.train.update(dict(steps=2000, batch_size=16, seq_len=128, eval_every=500, eval_batches=2))
    c.optimizer.update(dict(lr=3e-3, warmup_steps=20))
    c.checkpoint.every_steps = 500
    c.data.update(dict(format="copy", tokenizer="kimi", tokenizer_path=f"{DATA}/tokenizer"))
    return c
  c.init_from = "workdirs/sft_demo/pretrain"
  c.train.update(dict(steps=1000, batch_size=8, seq_len=639, eval_every=250, eval_batches=4))
  c.optimizer.update(dict(lr=3e-3, warmup_steps=30))
  c.checkpoint.update(dict(every_steps=250, keep=4))
  c.data.update(dict(source=f"{DATA}/train.jsonl", format="chat", val_fraction=0.02))
  return c
