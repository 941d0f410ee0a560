"""Loss terms against float64 numpy: the policy objectives' gradients in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.train import losses

V, T = 7, 6


def _setup(seed=0):
  """A bigram policy logits[b, t] = theta[token[b, t]], 2 prompts x 3 sampled responses."""
  rng = np.random.default_rng(seed)
  theta = rng.normal(0, 1, (V, V))
  tokens = rng.integers(0, V, (6, T + 1))
  mask = (rng.random((6, T + 1)) < 0.6).astype(np.float32)
  mask[:, :2] = 0  # the prompt's tokens are not the policy's.
  mask[:, -1] = 1  # every response has a token.
  reward = rng.random(6)
  group_mean = reward.reshape(2, 3).mean(1).repeat(3)
  logp = theta - np.log(np.exp(theta).sum(-1, keepdims=True))  # log softmax per row, float64
  old = np.zeros((6, T + 1))
  old[:, 1:] = logp[tokens[:, :-1], tokens[:, 1:]]
  return theta, tokens, mask, reward, group_mean, logp, old


def _grad_logp(theta, prev, tok):
  """d log softmax(theta[prev])[tok] / d theta, float64."""
  p = np.exp(theta[prev] - theta[prev].max())
  p /= p.sum()
  g = np.zeros_like(theta)
  g[prev] = -p
  g[prev, tok] += 1
  return g


def _term_grad(term, theta, batch):
  def loss(th):
    out = {"logits": th[batch["tokens"][:, :-1]]}
    return term.total(out, batch) / term.count(batch)

  return jax.value_and_grad(loss)(jnp.asarray(theta, jnp.float32))


def _batch(tokens, mask, adv, old):
  return {"tokens": jnp.asarray(tokens), "policy_mask": jnp.asarray(mask),
          "advantage": jnp.asarray(adv, jnp.float32), "old_logprobs": jnp.asarray(old, jnp.float32)}


def test_kimi_policy_gradient_at_pi_old_is_reinforce_with_the_group_mean_baseline():
  theta, tokens, mask, reward, group_mean, _, old = _setup()
  tau = 0.3
  adv = reward - group_mean
  value, grad = _term_grad(losses.kimi_policy_term(tau), theta, _batch(tokens, mask, adv, old))
  assert float(value) == pytest.approx(np.mean(adv ** 2), rel=1e-5)  # log-ratio 0 at pi_old
  want = np.zeros_like(theta)
  for b in range(6):
    for t in range(1, T + 1):
      if mask[b, t]:
        want += -2 * tau / 6 * adv[b] * _grad_logp(theta, tokens[b, t - 1], tokens[b, t])
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(grad, want, atol=1e-5)


def test_kimi_policy_value_away_from_pi_old():
  theta, tokens, mask, reward, group_mean, logp, old = _setup(1)
  tau, adv = 0.5, reward - group_mean
  shifted = old - 0.2 * mask  # pi_old lower than pi_theta on every policy token.
  value, _ = _term_grad(losses.kimi_policy_term(tau), theta, _batch(tokens, mask, adv, shifted))
  log_ratio = (0.2 * mask[:, 1:]).sum(-1)
  assert float(value) == pytest.approx(np.mean((adv - tau * log_ratio) ** 2), rel=1e-5)


def test_grpo_gradient_and_clipping():
  """At pi_old (ratio 1) the gradient is -mean over policy tokens of A grad log pi; tokens whose
  ratio is already past 1 + eps with A > 0 (or below 1 - eps with A < 0) contribute nothing."""
  theta, tokens, mask, reward, group_mean, _, old = _setup(2)
  adv = (reward - group_mean) / (reward.reshape(2, 3).std(1).repeat(3) + 1e-6)
  _, grad = _term_grad(losses.grpo_term(0.2), theta, _batch(tokens, mask, adv, old))
  n = mask[:, 1:].sum()
  want = np.zeros_like(theta)
  for b in range(6):
    for t in range(1, T + 1):
      if mask[b, t]:
        want += -adv[b] / n * _grad_logp(theta, tokens[b, t - 1], tokens[b, t])
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(grad, want, atol=1e-5)
  # Push every ratio to e^0.5 > 1.2: only the negative-advantage responses still pull.
  _, clipped = _term_grad(losses.grpo_term(0.2), theta, _batch(tokens, mask, adv, old - 0.5))
  want = np.zeros_like(theta)
  for b in range(6):
    for t in range(1, T + 1):
      if mask[b, t] and adv[b] < 0:
        want += -adv[b] * np.exp(0.5) / n * _grad_logp(theta, tokens[b, t - 1], tokens[b, t])
  np.testing.assert_allclose(clipped, want, atol=1e-5)


def test_policy_terms_refuse_bad_parameters():
  with pytest.raises(ValueError, match=r"^rl.tau must be > 0"):
    losses.kimi_policy_term(0.0)
  with pytest.raises(ValueError, match=r"^rl.clip_eps must be in \(0, 1\)"):
    losses.grpo_term(1.5)
