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

Self-speculative decoding (`speculative="mtp"`, greedy only) drafts with the model's first
multi-token-prediction layer (DeepSeek-V3), which predicts the token after next from the main
model's normed hidden state at a position and the token after it. Each step, one main-model
forward over [token, draft] verifies the draft: it stands when it equals the main model's greedy
choice, which then also gives the token after it. One MTP forward over the same two positions,
given the main model's hidden states and the tokens it chose, writes the MTP cache and drafts the
next token. A rejected draft's cache entries are overwritten by the next step before any query
sees them. The tokens are the main model's greedy choices, as without speculation, one or two per
step: identical to plain greedy decoding where the main model's logits over [token, draft] equal
those of a one-token forward (bit for bit in float32 here; bfloat16 matmuls of two rows may round
differently from one row's and flip a near-tie).
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
from k2jax.model import Transformer, mtp
from k2jax.model.transformer import init_cache

PROMPT_BUCKET = 64
SPECULATIVE = ("mtp",)


class Generation(NamedTuple):
  """Per row: the new tokens (through the first stop token, included), the log-probability of
  each under the model, and whether the row ended at a stop token (False: max_new_tokens). With
  speculative decoding also, per row, the drafts the main model checked and how many of them it
  accepted, i.e. kept as tokens (None without)."""

  tokens: list[list[int]]
  logprobs: list[list[float]]
  finished: list[bool]
  drafted: list[int] | None = None
  accepted: list[int] | None = None


def generate(cfg: ModelConfig, variables: dict, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, stop_tokens: Sequence[int] = (),
             valid_vocab: int | None = None,
             callback: Callable[[np.ndarray, np.ndarray], None] | None = None,
             speculative: str | None = None) -> Generation:
  """Continues each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

  Only ids below `valid_vocab` (the tokenizer's vocabulary when the model's is padded) are drawn.
  `callback(token_B, live_B)` is called on the host once per generated token position, in order;
  live_B marks the rows that produced token_B (a row is live through its stop token). The
  "capacity" MoE dispatch is replaced by the dropless "sort" one: generation never drops a token.
  `speculative="mtp"` drafts one token per step with the model's first MTP layer (greedy
  decoding only; module docstring).
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
  if speculative is not None:
    if speculative not in SPECULATIVE:
      raise ValueError(f"generate: speculative must be None or one of {SPECULATIVE}, "
                       f"got {speculative!r}")
    if not cfg.num_nextn_predict_layers:
      raise ValueError("generate: speculative='mtp' needs MTP layers "
                       "(ModelConfig.num_nextn_predict_layers is 0)")
    if temperature != 0:
      raise ValueError(f"generate: speculative='mtp' decodes greedily only (temperature 0), got "
                       f"temperature {temperature}")
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
  variables = {k: variables[k] for k in ("params", "router") if k in variables}
  stop_S = np.asarray(stop_tokens, np.int32).reshape(-1)
  _STREAM[0] = callback
  try:
    if speculative is None:
      tokens_BN, logprobs_BN, steps = _generate(
          variables, prompt_BT, np.asarray(lengths, np.int32), jax.random.key(seed),
          np.float32(max(temperature, 1e-6)), np.float32(top_p), stop_S, cfg=cfg,
          max_new_tokens=max_new_tokens, greedy=temperature == 0, top_k=top_k,
          nucleus=top_p < 1, valid_vocab=vocab, stream=callback is not None)
      steps = int(steps)
      tokens = np.asarray(tokens_BN)[:, :steps].tolist()
      logprobs, drafts = np.asarray(logprobs_BN)[:, :steps].tolist(), (None, None)
    else:
      out = jax.device_get(_speculate(
          variables, prompt_BT, np.asarray(lengths, np.int32), stop_S, cfg=cfg,
          max_new_tokens=max_new_tokens, valid_vocab=vocab, stream=callback is not None))
      tokens, logprobs, *drafts = _unpack_speculated(*out)
  finally:
    _STREAM[0] = None
  stops = {int(t) for t in stop_tokens}
  result = Generation([], [], [], *drafts)
  for row, logp in zip(tokens, logprobs):
    row = row[:max_new_tokens]
    end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    result.tokens.append(row[:end])
    result.logprobs.append(logp[:end])
    result.finished.append(row[end - 1] in stops)
  return result


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
  forward = _decoder(cfg, variables, valid_vocab)

  def draw(logits_BV, step, done_B):
    token_B = sample_logits(logits_BV, jax.random.fold_in(key, step), temperature, top_p,
                            greedy=greedy, top_k=top_k, nucleus=nucleus)
    logp_B = _log_prob(logits_BV, token_B)
    if stream:
      io_callback(_emit, None, token_B, ~done_B, ordered=True)
    return token_B, logp_B, done_B | jnp.isin(token_B, stop_S)

  cache = init_cache(cfg, B, T + max_new_tokens)
  logits_BTV, _, cache = forward(prompt_BT, jnp.broadcast_to(jnp.arange(T), (B, T)), cache)
  token_B, logp_B, done_B = draw(logits_BTV[jnp.arange(B), lengths_B - 1], 0, jnp.zeros(B, bool))
  tokens_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
  logprobs_BN = jnp.zeros((B, max_new_tokens), jnp.float32).at[:, 0].set(logp_B)

  def body(carry):
    step, token_B, tokens_BN, logprobs_BN, done_B, cache = carry
    logits_B1V, _, cache = forward(token_B[:, None], (lengths_B + step - 1)[:, None], cache)
    token_B, logp_B, done_B = draw(logits_B1V[:, 0], step, done_B)
    return (step + 1, token_B, tokens_BN.at[:, step].set(token_B),
            logprobs_BN.at[:, step].set(logp_B), done_B, cache)

  def cond(carry):
    step, done_B = carry[0], carry[4]
    return (step < max_new_tokens) & ~jnp.all(done_B)

  steps, _, tokens_BN, logprobs_BN, _, _ = jax.lax.while_loop(
      cond, body, (1, token_B, tokens_BN, logprobs_BN, done_B, cache))
  return tokens_BN, logprobs_BN, steps


def _decoder(cfg: ModelConfig, variables: dict, valid_vocab: int) -> Callable:
  """forward(tokens_BT, positions_BT, cache) -> (logits_BTV, -inf past valid_vocab; the hidden
  states before the final norm; the cache), the main model in decode mode."""
  model = Transformer(cfg)

  def forward(tokens_BT, positions_BT, cache):
    (logits_BTV, _), mutated = model.apply({**variables, "cache": cache}, tokens_BT, positions_BT,
                                           decode=True, mutable=["cache", "intermediates"])
    return (_valid(logits_BTV, valid_vocab), mutated["intermediates"]["hidden_BTD"][0],
            mutated["cache"])

  return forward


def _valid(logits_BTV: jnp.ndarray, valid_vocab: int) -> jnp.ndarray:
  if valid_vocab < logits_BTV.shape[-1]:
    return jnp.where(jnp.arange(logits_BTV.shape[-1]) < valid_vocab, logits_BTV, -jnp.inf)
  return logits_BTV


def _log_prob(logits_BV: jnp.ndarray, token_B: jnp.ndarray) -> jnp.ndarray:
  """log softmax(logits)[token] (any leading axes)."""
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[..., None], axis=-1)[..., 0]


def _greedy(logits_BTV: jnp.ndarray) -> jnp.ndarray:
  return jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "valid_vocab", "stream"))
def _speculate(variables, prompt_BT, lengths_B, stop_S, *, cfg: ModelConfig, max_new_tokens: int,
               valid_vocab: int, stream: bool):
  """Greedy self-speculative decoding, one draft per step (module docstring): (the first token
  [B] and its log-prob [B]; per step, the two tokens the main model chose [B, N, 2], their
  log-probs, and how many of them the row took [B, N]: 0 once done, 2 when the draft stood)."""
  B, T = prompt_BT.shape
  N, rows_B = max_new_tokens, jnp.arange(B)
  forward = _decoder(cfg, variables, valid_vocab)

  def draft(hidden_BTD, next_BT, positions_BT, cache):
    logits_BTV, cache = mtp.draft_logits(cfg, variables, cache, hidden_BTD, next_BT, positions_BT)
    return _greedy(_valid(logits_BTV, valid_vocab)), cache

  def emit(token_B, live_B):
    if stream:
      io_callback(_emit, None, token_B, live_B, ordered=True)

  # Prefill: the prompt through the main model, then through the MTP layer with the token after
  # each position (the last one just chosen), which drafts the token after that.
  cache, mtp_cache = init_cache(cfg, B, T + N + 1), mtp.init_cache(cfg, B, T + N + 1)
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  logits_BTV, hidden_BTD, cache = forward(prompt_BT, positions_BT, cache)
  last_BV = logits_BTV[rows_B, lengths_B - 1]
  token_B = _greedy(last_BV)
  emit(token_B, jnp.ones(B, bool))
  next_BT = jnp.pad(prompt_BT[:, 1:], ((0, 0), (0, 1))).at[rows_B, lengths_B - 1].set(token_B)
  drafts_BT, mtp_cache = draft(hidden_BTD, next_BT, positions_BT, mtp_cache)
  state = dict(step=0, token=token_B, draft=drafts_BT[rows_B, lengths_B - 1], position=lengths_B,
               made=jnp.ones(B, jnp.int32), done=jnp.isin(token_B, stop_S) | (N == 1),
               chosen=jnp.zeros((B, N, 2), jnp.int32), logprobs=jnp.zeros((B, N, 2), jnp.float32),
               taken=jnp.zeros((B, N), jnp.int32), cache=cache, mtp_cache=mtp_cache)

  def body(s):
    live_B = ~s["done"]
    positions_B2 = s["position"][:, None] + jnp.arange(2)
    logits_B2V, hidden_B2D, cache = forward(jnp.stack([s["token"], s["draft"]], 1), positions_B2,
                                            s["cache"])
    chosen_B2 = _greedy(logits_B2V)  # the main model's token after each of the two positions.
    logp_B2 = _log_prob(logits_B2V, chosen_B2)
    stop_B2 = jnp.isin(chosen_B2, stop_S)
    two_B = live_B & (chosen_B2[:, 0] == s["draft"]) & ~stop_B2[:, 0]  # the draft stood.
    emit(chosen_B2[:, 0], live_B)
    emit(chosen_B2[:, 1], two_B)
    # The MTP layer over the same two positions with the tokens chosen: the entry of the second
    # is final only when the draft stood, and the next draft comes from the last token made.
    drafts_B2, mtp_cache = draft(hidden_B2D, chosen_B2, positions_B2, s["mtp_cache"])
    taken_B = live_B.astype(jnp.int32) + two_B
    made_B = s["made"] + taken_B
    at = (0, s["step"], 0)
    return dict(
        step=s["step"] + 1,
        token=jnp.where(two_B, chosen_B2[:, 1], jnp.where(live_B, chosen_B2[:, 0], s["token"])),
        draft=jnp.where(two_B, drafts_B2[:, 1], drafts_B2[:, 0]),
        position=s["position"] + taken_B, made=made_B,
        done=s["done"] | stop_B2[:, 0] | (two_B & stop_B2[:, 1]) | (made_B >= N),
        chosen=jax.lax.dynamic_update_slice(s["chosen"], chosen_B2[:, None], at),
        logprobs=jax.lax.dynamic_update_slice(s["logprobs"], logp_B2[:, None], at),
        taken=jax.lax.dynamic_update_slice(s["taken"], taken_B[:, None], at[:2]),
        cache=cache, mtp_cache=mtp_cache)

  s = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
  return token_B, _log_prob(last_BV, token_B), s["chosen"], s["logprobs"], s["taken"]


def _unpack_speculated(token_B, logp_B, chosen_BS2, logp_BS2, taken_BS):
  """Per row, the tokens and log-probs in order (the first, then each step's taken ones), the
  drafts checked (steps the row was live) and accepted (steps that took two)."""
  tokens, logprobs = [], []
  for b, taken_S in enumerate(taken_BS):
    keep_S2 = np.arange(2) < taken_S[:, None]
    tokens.append([int(token_B[b])] + chosen_BS2[b][keep_S2].tolist())
    logprobs.append([float(logp_B[b])] + logp_BS2[b][keep_S2].tolist())
  return tokens, logprobs, np.sum(taken_BS > 0, 1).tolist(), np.sum(taken_BS == 2, 1).tolist()
