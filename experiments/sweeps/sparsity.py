r"""Sparsity: 2 activated experts + 1 shared fixed, total experts 4 / 8 / 16 / 32, at 2 budgets.

  python experiments/sweep.py --sweep=experiments/sweeps/sparsity.py --workdir=sweeps/sparsity
  python experiments/analyze.py sweeps/sparsity

Paper [K2 §2.3]: with 8 activated + 1 shared expert fixed, raising the total experts (sparsity
8 / 16 / 32 / 48 / 64) lowers train and validation loss at equal FLOPs; at equal loss sparsity 48
needs 1.69x, 1.39x and 1.15x fewer FLOPs than sparsity 8, 16 and 32.

Here: a k2_nano-shaped model (hidden 128, 4 layers, 3 MoE layers) with top-2 routing, so sparsity
(total / activated) is 2 / 4 / 8 / 16; activated FLOPs are equal across sparsity (only the router
grows), and the budgets are 200 and 400 steps x 16 x 128 tokens. Analysis: eval loss against
FLOPs per expert count, C(E) / C(E=4) at equal loss, and loss against sparsity per budget.
Budget: 8 runs, 4.9M tokens in all.
Result and wall time: experiments/REPORT.md.
"""

from k2jax.train import default_config

ANALYSIS = {"kind": "compute", "arm": "model.n_routed_experts", "reference": "4", "x": "flops",
            "y": "eval_loss", "group": "train.steps", "arm_name": "routed experts (top-2)"}


def get_config():
  c = default_config()
  c.model.preset = "k2_nano"
  c.model.dtype = "bfloat16"
  c.model.num_experts_per_tok = 2
  c.train.update(dict(steps=400, batch_size=16, seq_len=128, log_every=10, eval_every=100,
                      eval_batches=8))
  c.optimizer.update(dict(name="muonclip", lr=3e-3, weight_decay=0.1, warmup_steps=30))
  c.checkpoint.every_steps = 100
  c.data.update(dict(source="python_stdlib", tokenizer="byte"))
  c.sample.num_tokens = 0
  return c


def get_hyper(h):
  return h.product([
      h.sweep("train.steps", [200, 400]),
      h.sweep("model.n_routed_experts", [4, 8, 16, 32]),
  ])
