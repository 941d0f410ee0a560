"""The decoder (compressed MLA cache): per-step parity with the full forward, transformers' greedy
`generate` token for token (uneven prompts batched, stop tokens), log-probs, top-k and nucleus
sampling, streaming, the train loop's closing sample on the same path, and self-speculative
decoding with the MTP layer against plain greedy decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_hf_parity import CASES, _hf_model

from k2jax import decode, presets
from k2jax.decode import generate
from k2jax.hf import from_torch_state_dict
from k2jax.model import Transformer, init_variables
from k2jax.model.transformer import init_cache


@functools.cache
def _model(name: str):
  """The HF model (peaked attention, a routing bias) and the same weights as k2jax variables."""
  model = _hf_model(CASES[name])
  model.generation_config.eos_token_id = None  # run every requested step.
  return model, from_torch_state_dict(CASES[name], model.state_dict())


@pytest.mark.parametrize("name", ["qlora_yarn", "plain_q_groups"])
def test_every_cached_step_matches_the_full_forward(name):
  cfg, (_, variables) = CASES[name], _model(name)
  B, T, prefill = 2, 24, 5  # past YaRN's original 16 positions.
  tokens_BT = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)))
  full_BTV, _ = jax.jit(Transformer(cfg).apply)(variables, tokens_BT)
  cache = init_cache(cfg, B, T)
  # Only the normalised latent and the rotary key are cached: kv_lora + dr numbers per token.
  shapes = sorted(x.shape for x in jax.tree.leaves(cache))
  want = [(L, B, T, d) for L in (cfg.num_dense_layers, cfg.num_moe_layers)
          for d in (cfg.kv_lora_rank, cfg.qk_rope_head_dim)]
  assert shapes == sorted(want)
  step = jax.jit(functools.partial(Transformer(cfg).apply, decode=True, mutable=["cache"]))

  def run(tokens, positions, cache):
    (logits, _), mutated = step({**variables, "cache": cache}, tokens, positions)
    return logits, mutated["cache"]

  positions = jnp.broadcast_to(jnp.arange(prefill), (B, prefill))
  logits, cache = run(tokens_BT[:, :prefill], positions, cache)
  got = [logits]
  for t in range(prefill, T):
    logits, cache = run(tokens_BT[:, t:t + 1], jnp.full((B, 1), t), cache)
    got.append(logits)
  got_BTV = np.concatenate(got, axis=1)
  scale = np.max(np.abs(full_BTV))
  err_T = np.max(np.abs(got_BTV - np.asarray(full_BTV)), axis=(0, 2)) / scale
  assert np.all(err_T <= 1e-5), err_T


def test_greedy_matches_transformers_generate():
  """Uneven prompts batched together equal transformers' greedy generate of each alone; a stop
  token ends a row after it (included), the other rows run on."""
  name = "qlora_yarn"
  cfg, (model, variables) = CASES[name], _model(name)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 6)]
  n_new = 14  # up to position 22: past YaRN's original 16.
  ref = []
  for p in prompts:
    out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n_new,
                         pad_token_id=0)
    ref.append(out[0, len(p):].tolist())
  assert all(len(r) == n_new for r in ref)
  stop = ref[1][4]
  want = [r[:r.index(stop) + 1] if stop in r else r for r in ref]
  assert len(want[1]) <= 5 and max(len(w) for w in want) == n_new
  got = generate(cfg, variables, prompts, n_new, stop_tokens=[stop])
  assert got.tokens == want
  assert got.finished == [stop in w for w in want] and got.finished[1]


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_nucleus_sampling_draws_from_the_tempered_nucleus():
  name = "qlora_yarn"
  cfg, (_, variables) = CASES[name], _model(name)
  prompt = [5, 17, 33, 2, 60, 41]
  temperature, top_p, n = 0.7, 0.6, 4096
  logits_V = np.asarray(jax.jit(Transformer(cfg).apply)(variables, jnp.asarray([prompt]))[0][0, -1],
                        np.float64)

  def nucleus_probs(t):
    p = np.exp((logits_V - logits_V.max()) / t)
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[np.cumsum(p[order]) - p[order] < top_p]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    return q

  want = nucleus_probs(temperature)
  assert 3 <= np.count_nonzero(want) <= 8  # several tokens, and a real cut.
  assert 0.5 * np.abs(want - nucleus_probs(1.0)).sum() > 0.1  # the temperature matters.
  draws = generate(cfg, variables, [prompt] * n, 1, temperature=temperature, top_p=top_p,
                   seed=3)
  counts = np.bincount([d[0] for d in draws.tokens], minlength=cfg.vocab_size)
  assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want))
  assert 0.5 * np.abs(counts / n - want).sum() < 0.04
  again = generate(cfg, variables, [prompt] * n, 1, temperature=temperature, top_p=top_p, seed=3)
  other = generate(cfg, variables, [prompt] * n, 1, temperature=temperature, top_p=top_p, seed=4)
  assert again.tokens == draws.tokens and other.tokens != draws.tokens


def test_bad_arguments_raise():
  cfg, (_, variables) = CASES["qlora_yarn"], _model("qlora_yarn")
  for kwargs, match in [
      (dict(prompts=[]), "prompts is empty"),
      (dict(prompts=[[1], []]), "prompt 1 is empty"),
      (dict(prompts=[[1, cfg.vocab_size]]), r"prompt 0 has a token outside \[0, 64\)"),
      (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
      (dict(max_new_tokens=cfg.max_position_embeddings), "exceeds max_position_embeddings"),
      (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
      (dict(temperature=-1.0), "temperature must be >= 0"),
      (dict(top_k=-1), r"top_k must be an integer in \[0, 64\]")]:
    args = {"prompts": [[1, 2]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
      generate(cfg, variables, **args)


def test_log_probs_stops_and_streaming():
  """Sampled rows end independently at any of several stop ids; every returned log-prob equals
  the full forward's log-softmax at that token; the callback sees every step in order."""
  name = "qlora_yarn"
  cfg, (_, variables) = CASES[name], _model(name)
  prompts = [[3, 9, 27], [5, 1, 50, 41, 2, 8, 13], [7]]
  seen = []
  got = generate(cfg, variables, prompts, 12, temperature=1.3, seed=1, stop_tokens=[4, 11, 30],
                 valid_vocab=60, callback=lambda t, live: seen.append((t.copy(), live.copy())))
  assert len(seen) == max(len(t) for t in got.tokens)
  rows = [p + t for p, t in zip(prompts, got.tokens)]
  padded = np.zeros((len(rows), max(map(len, rows))), np.int32)  # right padding: causal-safe.
  for row, r in zip(padded, rows):
    row[:len(r)] = r
  full, _ = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(padded))
  logp_all = np.asarray(jax.nn.log_softmax(full[..., :60]))
  for b, (toks, logps) in enumerate(zip(got.tokens, got.logprobs)):
    assert len(toks) == len(logps) and max(toks) < 60
    assert got.finished[b] == (toks[-1] in (4, 11, 30))
    assert not set(toks[:-1]) & {4, 11, 30}
    assert [int(s[0][b]) for s in seen[:len(toks)]] == toks  # streamed as produced
    assert all(s[1][b] for s in seen[:len(toks)]) and not any(s[1][b] for s in seen[len(toks):])
    start = len(prompts[b]) - 1
    want = logp_all[b, start + np.arange(len(toks)), toks]
    np.testing.assert_allclose(logps, want, atol=2e-5)
  assert sum(got.finished) >= 1 and len({len(t) for t in got.tokens}) > 1


def test_top_k_draws_only_the_k_most_likely():
  name = "qlora_yarn"
  cfg, (_, variables) = CASES[name], _model(name)
  prompt = [5, 17, 33, 2, 60, 41]
  logits_V = np.asarray(jax.jit(Transformer(cfg).apply)(variables, jnp.asarray([prompt]))[0][0, -1])
  draws = generate(cfg, variables, [prompt] * 512, 1, temperature=2.0, top_k=3, seed=0)
  assert set(t[0] for t in draws.tokens) == set(np.argsort(-logits_V)[:3].tolist())


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_train_closing_sample_is_the_decoder(monkeypatch, corpus, tmp_path):
  """train()'s closing sample goes through k2jax.decode.generate (one decoder)."""
  from test_train import tiny_config

  from k2jax.train import train
  calls = []
  real = decode.generate
  monkeypatch.setattr(decode, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
  config = tiny_config(corpus, steps=2, eval_every=0)
  summary = train(config, str(tmp_path))
  assert len(calls) == 1 and calls[0]["valid_vocab"] == 257
  assert isinstance(summary["sample"], str) and summary["sample"].startswith(config.sample.prompt)


def test_bfloat16_rows_batched_equal_rows_alone():
  """A bfloat16 model decodes a batch (XLA:CPU lacks a bf16 kernel for one attention contraction
  order at batch > 1: regression) as it decodes each row alone, greedily."""
  cfg = CASES["qlora_yarn"].replace(dtype="bfloat16")
  variables = _model("qlora_yarn")[1]
  prompts = [[3, 9, 27, 4], [5, 1, 50]]
  batched = generate(cfg, variables, prompts, 6).tokens
  assert batched == [generate(cfg, variables, [p], 6).tokens[0] for p in prompts]


@functools.cache
def _mtp_model():
  """A tiny random model with one MTP layer; a 16-token vocabulary, so that its drafts are
  sometimes right and sometimes wrong."""
  cfg = presets.get("k2_nano", vocab_size=16, hidden_size=64, num_hidden_layers=3,
                    n_routed_experts=8, num_nextn_predict_layers=1, init_std=0.3)
  return cfg, init_variables(cfg, 0)


@pytest.mark.slow  # two stop settings x two decoders, each compiling its loop.
def test_speculative_decoding_equals_greedy_decoding():
  """speculative="mtp" returns plain greedy decoding's tokens, log-probs and finished flags, and
  streams the same tokens in the same order: uneven prompts batched together, stop ids, rows that
  run to max_new_tokens; drafts both accepted and rejected."""
  cfg, variables = _mtp_model()
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 14, n).tolist() for n in (3, 11, 6, 1, 8)]
  for stops, valid in (([5, 9], 16), ([], 14)):
    streams = {}
    out = {}
    for spec in (None, "mtp"):
      seen = streams[spec] = []
      out[spec] = generate(cfg, variables, prompts, 40, stop_tokens=stops, valid_vocab=valid,
                           speculative=spec,
                           callback=lambda t, live, seen=seen: seen.append((t, live)))
    plain, fast = out[None], out["mtp"]
    assert fast.tokens == plain.tokens and fast.finished == plain.finished
    for a, b in zip(fast.logprobs, plain.logprobs):
      np.testing.assert_allclose(a, b, atol=1e-5)
    for b, toks in enumerate(plain.tokens):  # each row's live stream is its tokens, in order.
      for spec in (None, "mtp"):
        assert [int(t[b]) for t, live in streams[spec] if live[b]] == toks
    assert plain.drafted is None and len(fast.drafted) == len(prompts)
    assert 0 < sum(fast.accepted) < sum(fast.drafted)
    assert all(d <= len(t) for d, t in zip(fast.drafted, fast.tokens))
    assert max(max(t) for t in plain.tokens) < valid
    assert bool(stops) == any(plain.finished) and not all(plain.finished)


def test_speculative_decoding_refusals():
  cfg, variables = _mtp_model()
  for kwargs, match in [
      (dict(temperature=0.7), r"greedily only \(temperature 0\), got temperature 0.7"),
      (dict(speculative="medusa"), r"speculative must be None or one of \('mtp',\)")]:
    with pytest.raises(ValueError, match=match):
      generate(cfg, variables, [[1, 2]], 4, **{"speculative": "mtp", **kwargs})
  plain = CASES["qlora_yarn"]
  with pytest.raises(ValueError, match=r"needs MTP layers \(ModelConfig.num_nextn_predict_"):
    generate(plain, _model("qlora_yarn")[1], [[1, 2]], 4, speculative="mtp")
