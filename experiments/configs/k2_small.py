r"""k2_small (~130M params, 64 experts, top-8 + 1 shared) with MuonClip, 8192-id BPE.

  python experiments/train.py --config=experiments/configs/k2_small.py --workdir=workdirs/k2_small

330M tokens: an accelerator-sized run; benchmarks/train_throughput.py times its step.
"""

from k2jax.train import default_config


def get_config():
  c = default_config()
  c.model.preset = "k2_small"
  c.model.dtype = "bfloat16"
  c.train.steps = 5000
  c.train.batch_size = 64
  c.train.grad_accum = 4
  c.train.seq_len = 1024
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.optimizer.name = "muonclip"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 250
  c.checkpoint.every_steps = 500
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 8192
  return c
