r"""MuonClip vs AdamW at 4 model sizes, same lr and weight decay (RMS matching).

  python experiments/sweep.py --sweep=experiments/sweeps/muon_vs_adamw.py \
      --workdir=sweeps/muon_vs_adamw
  python experiments/analyze.py sweeps/muon_vs_adamw

Paper [Moonlight, arXiv 2502.16982]: Muon reaches AdamW's loss with about 52% of the training
FLOPs; loss = 2.506 * C^-0.052 (Muon) vs 2.608 * C^-0.054 (AdamW), Muon reusing AdamW's tuned
learning rate and weight decay thanks to the 0.2 * sqrt(max(A, B)) update-RMS matching.

Here: K2-shaped models from 0.14M to 1.23M activated parameters (byte tokens, Python standard
library), each trained for the same token budget with both optimizers at lr 3e-3 and wd 0.1 (the
lr of the k2_nano demo; not re-tuned per optimizer, as in the paper's claim). Analysis: eval loss
against training FLOPs per optimizer, fitted power laws and C(MuonClip) / C(AdamW) at equal loss.
Budget: 8 runs of 300 steps x 16 x 128 tokens (4.9M tokens).
Result and wall time: experiments/REPORT.md.
"""

from k2jax.train import default_config

ANALYSIS = {"kind": "compute", "arm": "optimizer.name", "reference": "adamw", "x": "flops",
            "y": "eval_loss"}

# (hidden, layers, heads, dense FFN, expert FFN); head dims, 16 experts top-2 + 1 shared fixed.
SIZES = [(64, 2, 2, 192, 32), (96, 3, 3, 288, 48), (128, 4, 4, 384, 64), (192, 4, 4, 576, 96)]


def get_config():
  c = default_config()
  c.model.preset = "k2_nano"
  c.model.dtype = "bfloat16"
  c.train.update(dict(steps=300, batch_size=16, seq_len=128, log_every=10, eval_every=100,
                      eval_batches=8))
  c.optimizer.update(dict(lr=3e-3, weight_decay=0.1, warmup_steps=30))
  c.checkpoint.every_steps = 100
  c.data.update(dict(source="python_stdlib", tokenizer="byte"))
  c.sample.num_tokens = 0
  return c


def get_hyper(h):
  return h.product([
      h.zipit([
          h.sweep("label.size", [f"d{d}l{l}" for d, l, *_ in SIZES]),
          h.sweep("model.hidden_size", [s[0] for s in SIZES]),
          h.sweep("model.num_hidden_layers", [s[1] for s in SIZES]),
          h.sweep("model.num_attention_heads", [s[2] for s in SIZES]),
          h.sweep("model.intermediate_size", [s[3] for s in SIZES]),
          h.sweep("model.moe_intermediate_size", [s[4] for s in SIZES]),
      ]),
      h.sweep("optimizer.name", ["adamw", "muonclip"]),
  ])
