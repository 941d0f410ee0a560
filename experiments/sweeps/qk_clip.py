r"""QK-Clip: plain Muon at a high learning rate vs MuonClip with tau = 100 and tau = 30.

  python experiments/sweep.py --sweep=experiments/sweeps/qk_clip.py --workdir=sweeps/qk_clip
  python experiments/analyze.py sweeps/qk_clip

Paper [K2 §2.1, App. D]: without the clip, max attention logits of a 9B-active MoE on Muon passed
1000 within about 15k steps, with loss spikes; with tau = 100 they stay capped at 100 and the
clip switches itself off later; on 0.5B-active models an aggressive tau = 30 left the validation
loss indistinguishable from unclipped Muon.

Here: k2_nano (hidden 128, 4 layers, 4 heads) at lr 2e-2 (about 7x the demo's 3e-3) and no
weight decay, so that nothing but the clip holds the query/key weights back. Analysis: the max
logit over training per arm (tau lines dashed) and the final losses.
Budget: 3 runs of 600 steps x 16 x 128 tokens (3.7M tokens).
Result and wall time: experiments/REPORT.md.
"""

from k2jax.train import default_config

ANALYSIS = {"kind": "curves", "arm": "label.tau", "metric": "max_logit", "hlines": [30, 100]}


def get_config():
  c = default_config()
  c.model.preset = "k2_nano"
  c.model.dtype = "bfloat16"
  c.train.update(dict(steps=600, batch_size=16, seq_len=128, log_every=5, eval_every=200,
                      eval_batches=8))
  c.optimizer.update(dict(lr=2e-2, weight_decay=0.0, warmup_steps=20))
  c.checkpoint.every_steps = 200
  c.data.update(dict(source="python_stdlib", tokenizer="byte"))
  c.sample.num_tokens = 0
  return c


def get_hyper(h):
  return h.zipit([
      h.sweep("label.tau", ["off", "100", "30"]),
      h.sweep("optimizer.name", ["muon", "muonclip", "muonclip"]),
      h.sweep("optimizer.qk_clip_tau", [100.0, 100.0, 30.0]),
  ])
