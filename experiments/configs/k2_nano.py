r"""k2_nano with MuonClip on the Python standard library, bytes as tokens: the default demo.

  python experiments/train.py --config=experiments/configs/k2_nano.py --workdir=workdirs/k2_nano

The result it should give (loss, eval bits per byte, max attention logit far below tau, no
clipped head) is quoted in the README under "The two commands". To watch QK-Clip act, add
--config.optimizer.qk_clip_tau=10.
"""

from k2jax.train import default_config


def get_config():
  c = default_config()
  c.model.preset = "k2_nano"
  c.model.dtype = "bfloat16"
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.seq_len = 256
  c.train.log_every = 20
  c.train.eval_every = 100
  c.optimizer.name = "muonclip"
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 50
  c.checkpoint.every_steps = 200
  c.data.source = "python_stdlib"
  c.data.tokenizer = "byte"
  return c
