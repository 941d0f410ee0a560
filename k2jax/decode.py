"""The decoder: generation with the compressed MLA cache, for every caller (samples, chat, agents,
RL rollouts).

Prompts of different lengths share one batch: right-padded (to a multiple of PROMPT_BUCKET, so
prompts of similar lengths reuse one compiled program) and prefilled in one call, then every row
decodes at its own position. A row's padding slots in the cache are overwritten by the tokens it
generates before any query can see them (each query sees the cached positions up to its own).
Prefill and the decode loop run in one compiled function; each row stops after its first stop
token. Sampling: greedy at temperature 0, else softmax(logits / temperature) cut to the top_k
tokens and then to the nucleus top_p. Every sampled token comes with its log-probability under
the model, log softmax(logits) over the valid vocabulary (temperature 1, nothing cut): what a
policy-gradient update needs as log pi_old. A `callback` receives each step's tokens on the host
as they are produced (streaming).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from k2jax.config import ModelConfig
from k2jax.model import Transformer
from k2jax.model.transformer import init_cache

PROMPT_BUCKET = 64


class Generation(NamedTuple):
  """Per row: the new tokens (through the first stop token, included), the log-probability of
  each under the model, and whether the row ended at a stop token (False: max_new_tokens)."""

  tokens: list[list[int]]
  logprobs: list[list[float]]
  finished: list[bool]


def generate(cfg: ModelConfig, variables: dict, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, stop_tokens: Sequence[int] = (),
             valid_vocab: int | None = None,
             callback: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Generation:
  """Continues each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

  Only ids below `valid_vocab` (the tokenizer's vocabulary when the model's is padded) are drawn.
  `callback(token_B, live_B)` is called on the host once per step, in order; live_B marks the
  rows that produced token_B (a row is live through its stop token). The "capacity" MoE dispatch
  is replaced by the dropless "sort" one: generation never drops a token.
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
  if not (isinstance(top_k, int) and 0 <= top_k <= vocab):
    raise ValueError(f"generate: top_k must be an integer in [0, {vocab}], got {top_k!r}")
  if not 0 < vocab <= cfg.vocab_size:
    raise ValueError(f"generate: valid_vocab must be in [1, {cfg.vocab_size}], got {valid_vocab}")
  lengths = [len(p) for p in prompts]
  if max(lengths) + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"generate: the longest prompt ({max(lengths)}) + max_new_tokens "
                     f"({max_new_tokens}) exceeds max_position_embeddings "
                     f"({cfg.max_position_embeddings})")
  if cfg.moe_dispatch == "capacity":
    cfg = cfg.replace(moe_dispatch="sort")
  width = -(-max(lengths) // PROMPT_BUCKET) * PROMPT_BUCKET
  prompt_BT = np.zeros((len(prompts), width), np.int32)
  for row, p in zip(prompt_BT, prompts):
    row[:len(p)] = p
  _STREAM[0] = callback
  try:
    tokens_BN, logprobs_BN, steps = _generate(
        {k: variables[k] for k in ("params", "router") if k in variables}, prompt_BT,
        np.asarray(lengths, np.int32), jax.random.key(seed), np.float32(max(temperature, 1e-6)),
        np.float32(top_p), np.asarray(stop_tokens, np.int32).reshape(-1), cfg=cfg,
        max_new_tokens=max_new_tokens, greedy=temperature == 0, top_k=top_k,
        nucleus=top_p < 1, valid_vocab=vocab, stream=callback is not None)
    steps = int(steps)
  finally:
    _STREAM[0] = None
  stops = {int(t) for t in stop_tokens}
  out = Generation([], [], [])
  for row, logp in zip(np.asarray(tokens_BN)[:, :steps].tolist(),
                       np.asarray(logprobs_BN)[:, :steps].tolist()):
    end = next((i + 1 for i, t in enumerate(row) if t in stops), None)
    out.tokens.append(row[:end])
    out.logprobs.append(logp[:end])
    out.finished.append(end is not None)
  return out


def sample_logits(logits_BV: jnp.ndarray, key: jax.Array, temperature, top_p, *, greedy: bool,
                  top_k: int, nucleus: bool) -> jnp.ndarray:
  """Token ids [B]: the argmax when greedy, else a draw from softmax(logits / temperature) cut to
  the `top_k` most likely tokens (0: no cut), then to the nucleus: the most likely tokens whose
  probabilities first reach top_p."""
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
  if nucleus:
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    keep_sorted_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p  # keeps the first token.
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[rows_B1, order_BV].set(keep_sorted_BV)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


_STREAM: list[Callable | None] = [None]  # the running generate()'s callback.


def _emit(token_B, live_B):
  if _STREAM[0] is not None:
    _STREAM[0](np.asarray(token_B), np.asarray(live_B))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "top_k", "nucleus",
                                             "valid_vocab", "stream"))
def _generate(variables, prompt_BT, lengths_B, key, temperature, top_p, stop_S, *,
              cfg: ModelConfig, max_new_tokens: int, greedy: bool, top_k: int, nucleus: bool,
              valid_vocab: int, stream: bool):
  """(tokens [B, N], their log-probs [B, N], steps run): prefill, then one token per step."""
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
                            greedy=greedy, top_k=top_k, nucleus=nucleus)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], axis=-1)[:, 0]
    if stream:
      io_callback(_emit, None, token_B, ~done_B, ordered=True)
    return token_B, logp_B, done_B | jnp.isin(token_B, stop_S)

  cache = init_cache(cfg, B, T + max_new_tokens)
  logits_BTV, cache = forward(prompt_BT, jnp.broadcast_to(jnp.arange(T), (B, T)), cache)
  token_B, logp_B, done_B = draw(logits_BTV[jnp.arange(B), lengths_B - 1], 0, jnp.zeros(B, bool))
  tokens_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
  logprobs_BN = jnp.zeros((B, max_new_tokens), jnp.float32).at[:, 0].set(logp_B)

  def body(carry):
    step, token_B, tokens_BN, logprobs_BN, done_B, cache = carry
    logits_B1V, cache = forward(token_B[:, None], (lengths_B + step - 1)[:, None], cache)
    token_B, logp_B, done_B = draw(logits_B1V[:, 0], step, done_B)
    return (step + 1, token_B, tokens_BN.at[:, step].set(token_B),
            logprobs_BN.at[:, step].set(logp_B), done_B, cache)

  def cond(carry):
    step, done_B = carry[0], carry[4]
    return (step < max_new_tokens) & ~jnp.all(done_B)

  steps, _, tokens_BN, logprobs_BN, _, _ = jax.lax.while_loop(
      cond, body, (1, token_B, tokens_BN, logprobs_BN, done_B, cache))
  return tokens_BN, logprobs_BN, steps
