r"""Attention heads: heads = layers vs heads = 2x layers, at two model depths.

  python experiments/sweep.py --sweep=experiments/sweeps/heads.py --workdir=sweeps/heads
  python experiments/analyze.py sweeps/heads

Paper [K2 §2.3]: doubling the heads (128 vs 64 with 61 layers) improves validation loss by only
0.5% to 1.2% across compute budgets, while costing much more attention FLOPs at long context; K2
keeps 64 heads.

Here: hidden 128 with 2 and 4 layers, heads = layers or 2x layers (head dims fixed, so more
heads also means wider MLA projections and more FLOPs). Analysis: eval loss against FLOPs per
arm and the relative loss change of 2x heads at each depth.
Budget: 4 runs of 400 steps x 16 x 128 tokens (3.3M tokens).
Result and wall time: experiments/REPORT.md.
"""

from k2jax.train import default_config

ANALYSIS = {"kind": "compute", "arm": "label.heads", "reference": "=layers", "x": "flops",
            "y": "eval_loss", "group": "model.num_hidden_layers"}


def get_config():
  c = default_config()
  c.model.preset = "k2_nano"
  c.model.dtype = "bfloat16"
  c.train.update(dict(steps=400, batch_size=16, seq_len=128, log_every=10, eval_every=100,
                      eval_batches=8))
  c.optimizer.update(dict(name="muonclip", lr=3e-3, weight_decay=0.1, warmup_steps=30))
  c.checkpoint.every_steps = 100
  c.data.update(dict(source="python_stdlib", tokenizer="byte"))
  c.sample.num_tokens = 0
  return c


def get_hyper(h):
  return h.zipit([
      h.sweep("model.num_hidden_layers", [2, 2, 4, 4]),
      h.sweep("model.num_attention_heads", [2, 4, 4, 8]),
      h.sweep("label.heads", ["=layers", "=2x layers", "=layers", "=2x layers"]),
  ])
