r"""k2_micro (~17M params, 32 experts, top-4) with MuonClip on the stdlib corpus, 4096-id BPE.

  python experiments/train.py --config=experiments/configs/k2_micro.py --workdir=workdirs/k2_micro

An hours-long run on a CPU (8M tokens); its throughput is in benchmarks/RESULTS.md.
"""

from k2jax.train import default_config


def get_config():
  c = default_config()
  c.model.preset = "k2_micro"
  c.model.dtype = "bfloat16"
  c.train.steps = 2000
  c.train.batch_size = 16
  c.train.seq_len = 256
  c.train.log_every = 20
  c.train.eval_every = 250
  c.train.eval_batches = 8
  c.optimizer.name = "muonclip"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  c.checkpoint.every_steps = 250
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 4096
  return c
