"""Rollouts: K responses per task through the agent loop, the token budget, advantages, and the
batch an update trains on.

A sample is a conversation as the policy read and wrote it: `tokens`, `policy_mask` (1 on the
tokens the policy generated; prompts and tool results are 0) and `logprobs` (log pi_old of each
generated token when it was sampled). Its reward is the task checker's (1 on success, else 0);
a sample with more than `budget` policy tokens is cut after its budget-th one and rewarded
`penalty` instead. Advantages are per group of the K samples of a task: r_i - mean_j r_j for
K1.5's objective ("kimi"), divided by the group's standard deviation (+ 1e-6) for GRPO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from k2jax.agentic import Sampling, Task, run_episodes
from k2jax.agentic.agent import Generate

GRPO_EPS = 1e-6


class Sample(NamedTuple):
  """One response: int32 tokens [n], int32 policy_mask [n], float32 logprobs [n]."""

  tokens: np.ndarray
  policy_mask: np.ndarray
  logprobs: np.ndarray


def apply_budget(sample: Sample, budget: int) -> tuple[Sample, bool]:
  """(sample cut right after its `budget`-th policy token, True) when it has more policy tokens
  than `budget` (> 0), else (sample, False)."""
  generated = np.flatnonzero(sample.policy_mask)
  if not budget or len(generated) <= budget:
    return sample, False
  end = generated[budget - 1] + 1
  return Sample(*(x[:end] for x in sample)), True


def advantages(rewards_PK: np.ndarray, objective: str) -> np.ndarray:
  """[P * K] advantages of P groups of K rewards (module docstring), float32."""
  rewards_PK = np.asarray(rewards_PK, np.float64)
  adv_PK = rewards_PK - rewards_PK.mean(axis=1, keepdims=True)
  if objective == "grpo":
    adv_PK = adv_PK / (rewards_PK.std(axis=1, keepdims=True) + GRPO_EPS)
  elif objective != "kimi":
    raise ValueError(f"objective must be 'kimi' or 'grpo', got {objective!r}")
  return adv_PK.reshape(-1).astype(np.float32)


def policy_batch(samples: Sequence[Sample], advantage_B: np.ndarray, length: int
                 ) -> dict[str, np.ndarray]:
  """The rows [B, length] a policy term trains on (k2jax.train.losses): tokens, policy_mask,
  old_logprobs, segment_ids (1 on a sample's tokens, 0 on padding) and positions; a zero
  loss_mask (no cross-entropy); `advantage` [B]."""
  B = len(samples)
  batch = {k: np.zeros((B, length), np.int32)
           for k in ("tokens", "segment_ids", "positions", "loss_mask", "policy_mask")}
  batch["old_logprobs"] = np.zeros((B, length), np.float32)
  for i, s in enumerate(samples):
    n = len(s.tokens)
    if n > length:
      raise ValueError(f"policy_batch: sample {i} has {n} tokens, more than a row ({length})")
    batch["tokens"][i, :n], batch["policy_mask"][i, :n] = s.tokens, s.policy_mask
    batch["old_logprobs"][i, :n] = s.logprobs * (s.policy_mask > 0)
    batch["segment_ids"][i, :n], batch["positions"][i, :n] = 1, np.arange(n)
  batch["advantage"] = np.asarray(advantage_B, np.float32)
  return batch


def with_ptx(batch: dict[str, np.ndarray], ptx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The policy rows followed by PTX rows (tokens, segment_ids, positions, loss_mask of a chat
  batch), which get no policy mask and no advantage: one forward computes both losses."""
  B = len(ptx["tokens"])
  ptx = {**{k: np.asarray(v, batch[k].dtype) for k, v in ptx.items()},
         "policy_mask": np.zeros_like(ptx["tokens"], np.int32),
         "old_logprobs": np.zeros(ptx["tokens"].shape, np.float32),
         "advantage": np.zeros(B, np.float32)}
  if set(ptx) != set(batch) or ptx["tokens"].shape[1] != batch["tokens"].shape[1]:
    raise ValueError(f"with_ptx: PTX rows {sorted(ptx)} of length {ptx['tokens'].shape[1]} do not "
                     f"match the policy rows {sorted(batch)} of length {batch['tokens'].shape[1]}")
  return {k: np.concatenate([batch[k], ptx[k]]) for k in batch}


class Rollouts(NamedTuple):
  """An update's rollouts: the batch rows, the rewards [P * K] (group by group), statistics."""

  batch: dict[str, np.ndarray]
  rewards: np.ndarray
  stats: dict[str, float]


def collect(model: Generate, tokenizer, tasks: Sequence[Task], samples: int, sampling: Sampling,
            *, objective: str, length: int, max_turns: int, budget: int = 0,
            penalty: float = 0.0) -> Rollouts:
  """`samples` episodes of each task, all batched (one generate call per turn of every live
  episode), as policy rows of `length` tokens (conversations that would outgrow a row end as
  "max_tokens"). Statistics: reward mean and std, success rate (within the budget), valid-call
  rate (valid calls / calls; 1 without a call), mean response length (policy tokens), the
  truncated fraction and the fraction of tasks whose samples' rewards differ (the only ones with
  a non-zero advantage)."""
  group = [t for t in tasks for _ in range(samples)]
  episodes = run_episodes(model, tokenizer, group, max_turns, sampling, batch_size=len(group),
                          max_tokens=length)
  cut = [apply_budget(Sample(e.tokens, e.policy_mask, e.logprobs), budget) for e in episodes]
  rewards = np.asarray([penalty if over else e.reward for e, (_, over) in zip(episodes, cut)],
                       np.float32)
  batch = policy_batch([s for s, _ in cut], advantages(rewards.reshape(-1, samples), objective),
                       length)
  calls = sum(e.calls for e in episodes)
  stats = {
      "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
      "success": float(np.mean([e.outcome == "success" and not over
                                for e, (_, over) in zip(episodes, cut)])),
      "valid_call_rate": sum(e.valid_calls for e in episodes) / calls if calls else 1.0,
      "response_len": float(batch["policy_mask"].sum(axis=1).mean()),
      "truncated_frac": float(np.mean([over for _, over in cut])),
      "signal_frac": float(np.mean(rewards.reshape(-1, samples).std(axis=1) > 0)),
  }
  return Rollouts(batch, rewards, stats)
