r"""Agentic SFT in miniature: a widened k2_nano (MODEL below), briefly pretrained on the stdlib,

  python experiments/train.py --config=experiments/configs/k2_nano_sft.py:pretrain \
      --workdir=workdirs/sft_demo/pretrain
  python experiments/train.py --config=experiments/configs/k2_nano_sft.py \
      --workdir=workdirs/sft_demo/sft

then fine-tuned with MuonClip on the synthesised tool-use conversations of k2jax.agentic. Before
them, `python experiments/synthesize.py --out=workdirs/sft_demo/data --train=20000
--tokenizer_vocab=2048` writes the conversations and the tokenizer; after them, `python
experiments/agent_eval.py --workdir=workdirs/sft_demo/pretrain --workdir=workdirs/sft_demo/sft
--out=workdirs/sft_demo/eval` plays both as agents. `make sft-demo` runs all four.

`:pretrain` is the base model: 100 steps of next-token prediction on the stdlib with the K2-format
BPE that synthesize.py trained on the stdlib and the conversations (the least that makes a base
model; the SFT phase gets the time). The default (`:sft`) starts from its
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
# k2_nano widened to hidden 256 with dense FFNs in all 4 layers (MLA attention kept): on 2 CPU cores
# it trains faster per token than k2_nano's 16-expert MoE layers (see REPORT.md, "Agentic SFT").
MODEL = dict(hidden_size=256, intermediate_size=768, first_k_dense_replace=4)


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
    c.train.update(dict(steps=100, batch_size=8, seq_len=256, eval_every=100))
    c.optimizer.update(dict(lr=3e-3, warmup_steps=20))
    c.checkpoint.every_steps = 100
    c.data.update(dict(source="python_stdlib", tokenizer="kimi",
                       tokenizer_path=f"{DATA}/tokenizer"))
    return c
  c.init_from = "workdirs/sft_demo/pretrain"
  c.train.update(dict(steps=1000, batch_size=8, seq_len=639, eval_every=250, eval_batches=4))
  c.optimizer.update(dict(lr=1e-2, warmup_steps=30))
  c.checkpoint.update(dict(every_steps=250, keep=4))
  c.data.update(dict(source=f"{DATA}/train.jsonl", format="chat", val_fraction=0.02))
  return c
