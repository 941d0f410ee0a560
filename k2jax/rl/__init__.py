"""Reinforcement learning in miniature, K2's recipe (arXiv 2507.20534, §3.2; Kimi K1.5): on-policy
rollouts in k2jax.agentic's tool worlds with verifiable rewards, the K1.5 / K2 policy objective
(or GRPO's) optimised with MuonClip, and three stabilisers: a per-sample token budget, a PTX loss
on the SFT data, and a decaying sampling temperature.

    python experiments/rl.py --config=experiments/configs/k2_nano_rl.py \
        --config.init_from=workdirs/sft_demo/sft --workdir=workdirs/rl

The objectives are loss terms of k2jax.train.losses (`kimi_policy_term`, `grpo_term`); rollouts
become their batch fields here (k2jax.rl.rollouts); the loop is k2jax.rl.loop. The rl config
section (k2jax.rl.config.default_config):
  objective, tau, clip_eps    "kimi": mean (A_i - tau log(pi / pi_old)(y_i))^2, A_i = r_i - mean_j
                              r_j; "grpo": the clipped surrogate with A_i / std_j r_j
  prompts, samples            tasks per update, K responses per task (all sampled in one batch)
  grad_steps                  optimizer steps per batch of rollouts
  max_turns, max_new_tokens   the agent loop's budgets (replies, tokens per reply)
  temperature, final_temperature, temperature_decay_steps, top_p
                              sampling: linear decay over the first decay_steps updates
  budget, budget_penalty      policy tokens per sample (0: no budget); over it: cut, penalised
  ptx_weight                  the cross-entropy on config.data's batches (0: off)
  eval_heldout, eval_heldout_domain, eval_seed, task_seed
                              held-out tasks per evaluation; the task streams
"""

from k2jax.rl.config import default_config, temperature, validate
from k2jax.rl.loop import RLRun, train_rl
from k2jax.rl.rollouts import Rollouts, Sample, advantages, apply_budget, collect, policy_batch

__all__ = [
  "RLRun",
  "Rollouts",
  "Sample",
  "advantages",
  "apply_budget",
  "collect",
  "default_config",
  "policy_batch",
  "temperature",
  "train_rl",
  "validate",
]
