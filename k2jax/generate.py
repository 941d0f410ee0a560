"""Generation with the compressed MLA cache (K2_SPEC §2): greedy or nucleus sampling, stop tokens.

Prompts of different lengths share one batch: right-padded to the longest and prefilled in one
call, then every row decodes at its own position. A row's padding slots in the cache are
overwritten by the tokens generated there before any query can see them (each query sees the
cached positions up to its own). Prefill and the decode loop run in one compiled function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig
from k2jax.model import Transformer
from k2jax.model.transformer import init_cache


def generate(cfg: ModelConfig, variables: dict, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] = (), valid_vocab: int | None = None) -> list[list[int]]:
  """The new tokens of each prompt (token-id lists of any lengths).

  temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) restricted
  to the nucleus: the most likely tokens whose probabilities first reach `top_p`. A row ends
  after its first stop token (included) or `max_new_tokens`. Only ids below `valid_vocab` (the
  tokenizer's vocabulary when the model's is padded) are drawn. The "capacity" MoE dispatch is
  replaced by the dropless "sort" one: generation never drops a token.
  """
  prompts = [list(p) for p in prompts]
  vocab = cfg.vocab_size if valid_vocab is None else valid_vocab
  if not prompts:
    raise ValueError("generate: prompts is empty")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"generate: prompt {i} is empty")
    if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in p):
      raise ValueError(f"generate: prompt {i} has a token outside [0, {vocab})")
  if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
  if not 0 < vocab <= cfg.vocab_size:
    raise ValueError(f"generate: valid_vocab must be in [1, {cfg.vocab_size}], got {valid_vocab}")
  lengths = [len(p) for p in prompts]
  if max(lengths) + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"generate: the longest prompt ({max(lengths)}) + max_new_tokens "
                     f"({max_new_tokens}) exceeds max_position_embeddings "
                     f"({cfg.max_position_embeddings})")
  if cfg.moe_dispatch == "capacity":
    cfg = cfg.replace(moe_dispatch="sort")
  prompt_BT = np.zeros((len(prompts), max(lengths)), np.int32)
  for row, p in zip(prompt_BT, prompts):
    row[:len(p)] = p
  out_BN, steps = _generate(
      {k: variables[k] for k in ("params", "router") if k in variables}, prompt_BT,
      np.asarray(lengths, np.int32), jax.random.key(seed), np.float32(max(temperature, 1e-6)),
      np.float32(top_p), np.asarray(stop_tokens, np.int32).reshape(-1), cfg=cfg,
      max_new_tokens=max_new_tokens, greedy=temperature == 0, nucleus=top_p < 1,
      valid_vocab=vocab)
  out_BN, stops = np.asarray(out_BN)[:, :int(steps)], set(int(t) for t in stop_tokens)
  result = []
  for row in out_BN.tolist():
    ends = [i for i, t in enumerate(row) if t in stops]
    result.append(row[:ends[0] + 1] if ends else row)
  return result


def sample_logits(logits_BV: jnp.ndarray, key: jax.Array, temperature, top_p, *,
                  greedy: bool, nucleus: bool) -> jnp.ndarray:
  """Token ids [B]: the argmax when greedy, else a draw from softmax(logits / temperature),
  restricted (when `nucleus`) to the most likely tokens whose probabilities first reach top_p."""
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if nucleus:
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    keep_sorted_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p  # keeps the first token.
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[rows_B1, order_BV].set(keep_sorted_BV)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "nucleus",
                                             "valid_vocab"))
def _generate(variables, prompt_BT, lengths_B, key, temperature, top_p, stop_S, *,
              cfg: ModelConfig, max_new_tokens: int, greedy: bool, nucleus: bool,
              valid_vocab: int):
  """(new tokens [B, max_new_tokens], number of steps run): prefill, then one token per step."""
  B, T = prompt_BT.shape
  model = Transformer(cfg)

  def forward(tokens_BT, positions_BT, cache):
    (logits_BTV, _), mutated = model.apply({**variables, "cache": cache}, tokens_BT, positions_BT,
                                           decode=True, mutable=["cache"])
    if valid_vocab < cfg.vocab_size:
      logits_BTV = jnp.where(jnp.arange(cfg.vocab_size) < valid_vocab, logits_BTV, -jnp.inf)
    return logits_BTV, mutated["cache"]

  def draw(logits_BV, step, done_B):
    token_B = sample_logits(logits_BV, jax.random.fold_in(key, step), temperature, top_p,
                            greedy=greedy, nucleus=nucleus)
    return token_B, done_B | jnp.isin(token_B, stop_S)

  cache = init_cache(cfg, B, T + max_new_tokens)
  logits_BTV, cache = forward(prompt_BT, jnp.broadcast_to(jnp.arange(T), (B, T)), cache)
  token_B, done_B = draw(logits_BTV[jnp.arange(B), lengths_B - 1], 0, jnp.zeros(B, bool))
  out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(token_B)

  def body(carry):
    step, token_B, out_BN, done_B, cache = carry
    logits_B1V, cache = forward(token_B[:, None], (lengths_B + step - 1)[:, None], cache)
    token_B, done_B = draw(logits_B1V[:, 0], step, done_B)
    return step + 1, token_B, out_BN.at[:, step].set(token_B), done_B, cache

  def cond(carry):
    step, _, _, done_B, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  steps, _, out_BN, _, _ = jax.lax.while_loop(cond, body, (1, token_B, out_BN, done_B, cache))
  return out_BN, steps
