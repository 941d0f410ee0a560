"""Text from a trained model by full re-forward (no KV cache): greedy or temperature sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig
from k2jax.model import Transformer


def sample_tokens(model_cfg: ModelConfig, variables: dict, prompt_ids: list[int], num_tokens: int,
                  temperature: float = 0.0, rng: jax.Array | None = None,
                  num_valid: int | None = None) -> list[int]:
  """`num_tokens` ids continuing `prompt_ids`; temperature 0 is greedy.

  Only ids below `num_valid` (the tokenizer's vocabulary, when the model's is padded) are drawn.

  The sequence lives in a fixed buffer so one compiled forward serves every position; causal
  attention keeps the padding after the current position from affecting its logits.
  """
  if not prompt_ids:
    raise ValueError("sample: the prompt must encode to at least one token")
  total = len(prompt_ids) + num_tokens
  if total > model_cfg.max_position_embeddings:
    raise ValueError(f"sample: prompt + num_tokens = {total} exceeds max_position_embeddings "
                     f"({model_cfg.max_position_embeddings})")
  model = Transformer(model_cfg)
  rng = jax.random.PRNGKey(0) if rng is None else rng

  @jax.jit
  def generate(variables, tokens_1T, rng):
    def body(pos, carry):
      tokens_1T, rng = carry
      logits_1TV, _ = model.apply(variables, tokens_1T)
      logits_V = logits_1TV[0, pos - 1]
      if num_valid is not None:
        logits_V = jnp.where(jnp.arange(logits_V.shape[0]) < num_valid, logits_V, -jnp.inf)
      rng, key = jax.random.split(rng)
      if temperature > 0:
        nxt = jax.random.categorical(key, logits_V / temperature)
      else:
        nxt = jnp.argmax(logits_V)
      return tokens_1T.at[0, pos].set(nxt.astype(jnp.int32)), rng

    tokens_1T, _ = jax.lax.fori_loop(len(prompt_ids), total, body, (tokens_1T, rng))
    return tokens_1T

  tokens_1T = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt_ids)].set(
      jnp.asarray(prompt_ids, jnp.int32))
  out = np.asarray(generate(variables, tokens_1T, rng))
  return out[0, len(prompt_ids):].tolist()
