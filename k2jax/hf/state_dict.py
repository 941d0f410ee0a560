"""Hugging Face DeepseekV3 state dicts <-> k2jax variables, in memory (numpy arrays).

HF Linear weights are [out, in]; k2jax kernels are [in, out], blocks stacked per kind along a
leading layers axis (docs/INTERFACES.md). Routed experts are read under either naming:
transformers 5.x's fused `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and
`mlp.experts.down_proj` [E, D, F], or the hub checkpoints' per-expert
`mlp.experts.{e}.{gate,up,down}_proj.weight`.
Multi-token-prediction layers are DeepSeek-V3's `model.layers.{L + k}` (L = num_hidden_layers,
k < num_nextn_predict_layers): `enorm`, `hnorm`, `eh_proj`, a MoE decoder layer's `self_attn`,
`mlp`, `input_layernorm` and `post_attention_layernorm`, `shared_head.norm`, and copies of the
embedding (`embed_tokens`) and output head (`shared_head.head`), which k2jax shares with the main
model: reading checks each copy equals the main tensor, writing writes the copies. Layers past the
config's MTP layers are skipped with one warning (a config with num_nextn_predict_layers = 0 loads
the main model alone); an MTP layer the config has but the state dict lacks is an error. RoPE
buffers recomputed from the config (`...rotary_emb.inv_freq` and its kin, which
`model.named_buffers()` and older checkpoints carry) are skipped.

`rope_interleave=False` (HF's rotate-half RoPE, which pairs rotary dims (j, j + dr/2)) is mapped
exactly rather than rejected: rotary row j goes to 2j and row j + dr/2 to 2j + 1, in every head of
q_b / q_proj and in kv_a's k_pe rows. k2jax's interleaved RoPE then rotates the same pairs by the
same angles, so every q.k product has the same terms (only the summation order differs).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from absl import logging

from k2jax.config import ModelConfig
from k2jax.model import abstract_variables

Path = tuple[str, ...]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_HUB_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")
_RECOMPUTED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq|cos_cached|sin_cached)$")


class _Entry(NamedTuple):
  """One HF tensor and the k2jax leaf slices it fills: (leaf path, index) per target."""

  name: str
  shape: tuple[int, ...]
  targets: tuple[tuple[Path, tuple[int, ...]], ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  tied: bool = False  # a copy of a tensor k2jax shares (the MTP layers' embedding and head).


def from_torch_state_dict(cfg: ModelConfig, state_dict: Mapping[str, Any], *,
                          rope_interleave: bool = True) -> dict:
  """k2jax variables {"params", "router"} (numpy) from HF tensors (torch or numpy), HF names.

  `rope_interleave` is the HF config's flag (False: rotate-half weights, permuted on the way in).
  """
  n_main, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
  layers = {int(m.group(1)) for m in map(_LAYER.match, state_dict) if m}
  missing = [i for i in range(n_main, n_main + n_mtp) if i not in layers]
  if missing:
    raise ValueError(f"the checkpoint has no multi-token-prediction layer 'model.layers."
                     f"{missing[0]}' (num_nextn_predict_layers={n_mtp}); load with "
                     "num_nextn_predict_layers=0 to leave the MTP layers out")
  skipped = sorted(i for i in layers if i >= n_main + n_mtp)
  if skipped:
    logging.warning("k2jax.hf: skipping the multi-token-prediction layer(s) %s "
                    "(num_nextn_predict_layers=%d)",
                    ", ".join(f"model.layers.{i}" for i in skipped), n_mtp)
  sd = {k: v for k, v in state_dict.items()
        if not _is_layer_past(k, n_main + n_mtp) and not _RECOMPUTED.search(k)}
  hub = any(_HUB_EXPERT.search(k) for k in sd)
  entries = _entries(cfg, hub_experts=hub, rope_interleave=rope_interleave)
  known = {e.name for e in entries}
  for name in sorted(sd):
    if name not in known:
      if name.endswith("_scale_inv"):
        raise ValueError(f"tensor {name!r}: FP8 block-quantized weights must be dequantized first")
      raise ValueError(f"unexpected tensor {name!r} for this config")
  leaves = {p: np.zeros(a.shape, a.dtype) for p, a in _leaf_structs(cfg).items()}
  for e in entries:
    if e.name not in sd:
      if not e.targets:  # an empty shared-expert MLP (n_shared_experts=0) may be left out.
        continue
      raise ValueError(f"missing tensor {e.name!r}")
    w = _to_numpy(sd[e.name], e.name)
    if w.shape != e.shape:
      raise ValueError(f"tensor {e.name!r} has shape {tuple(w.shape)}, expected {e.shape}")
    for (path, index), value in zip(e.targets, e.to_ours(w)):
      if not e.tied:
        leaves[path][index] = value
      elif not np.array_equal(leaves[path][index], np.asarray(value, leaves[path].dtype)):
        raise ValueError(f"tensor {e.name!r} differs from the main model's "
                         f"{'/'.join(path[1:])}: k2jax shares the embedding and output head "
                         "between the main model and its MTP layers")
  return _nest(leaves)


def to_torch_state_dict(cfg: ModelConfig, variables: Mapping[str, Any], *,
                        hub_names: bool = False, rope_interleave: bool = True) -> dict:
  """HF tensors (numpy, [out, in]) named as installed transformers' DeepseekV3ForCausalLM does.

  `hub_names=True` writes the routed experts one by one, as hub checkpoints store them.
  `rope_interleave=False` writes rotate-half weights (for an HF config with that flag).
  """
  flat = _flatten({c: variables[c] for c in ("params", "router") if c in variables})
  shapes = {p: a.shape for p, a in _leaf_structs(cfg).items()}
  for path in sorted(set(flat) - set(shapes)):
    raise ValueError(f"unexpected variable {'/'.join(path)!r} for this config")
  for path, shape in shapes.items():
    if path not in flat:
      raise ValueError(f"missing variable {'/'.join(path)!r}")
    if flat[path].shape != shape:
      raise ValueError(f"variable {'/'.join(path)!r} has shape {flat[path].shape}, "
                       f"expected {shape}")
  out = {}
  for e in _entries(cfg, hub_experts=hub_names, rope_interleave=rope_interleave):
    slices = [flat[path][index] for path, index in e.targets]
    out[e.name] = np.ascontiguousarray(e.to_hf(*slices))
  return out


def _is_layer_past(name: str, n: int) -> bool:
  """Whether `name` belongs to a `model.layers.{i}` with i >= n."""
  m = _LAYER.match(name)
  return m is not None and int(m.group(1)) >= n


def _to_numpy(x: Any, name: str) -> np.ndarray:
  """numpy view of a torch tensor (bfloat16 via ml_dtypes) or of any array."""
  if hasattr(x, "detach"):
    import torch  # only reached with torch tensors; torch is a test-only dependency.

    t = x.detach().cpu()
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if not (t.dtype.is_floating_point and t.dtype.itemsize >= 2):
      raise ValueError(f"tensor {name!r} has dtype {t.dtype}; expected a float of 16+ bits "
                       "(FP8 checkpoints must be dequantized first)")
    return t.numpy()
  return np.asarray(x)


def _leaf_structs(cfg: ModelConfig) -> dict[Path, Any]:
  """The model's variable shapes and dtypes (docs/INTERFACES.md layout), keyed by path."""
  return {tuple(k.key for k in path): leaf for path, leaf
          in jax.tree_util.tree_flatten_with_path(abstract_variables(cfg))[0]}


def _copy(name: str, shape: tuple[int, ...], path: Path, index: tuple[int, ...]) -> _Entry:
  return _Entry(name, shape, ((path, index),), lambda w: (w,), lambda w: w)


def _linear(name: str, shape: tuple[int, ...], path: Path, index: tuple[int, ...],
            rows: np.ndarray | None = None) -> _Entry:
  """HF Linear weight [out, in] <-> kernel [in, out]; `rows` reorders HF outputs into ours."""
  if rows is None:
    return _Entry(name, shape, ((path, index),), lambda w: (w.T,), lambda k: k.T)
  inverse = np.argsort(rows)
  return _Entry(name, shape, ((path, index),), lambda w: (w[rows].T,), lambda k: k.T[inverse])


def _rope_rows(dr: int, rope_interleave: bool) -> np.ndarray:
  """HF rotary dim feeding each k2jax (interleaved) rotary dim: 2j <- j, 2j+1 <- j + dr/2."""
  if rope_interleave:
    return np.arange(dr)
  half = np.arange(dr // 2)
  return np.stack([half, half + dr // 2], axis=-1).reshape(-1)


def _entries(cfg: ModelConfig, *, hub_experts: bool, rope_interleave: bool) -> list[_Entry]:
  """Every HF tensor of `cfg`, in the order of DeepseekV3ForCausalLM.state_dict(), then the MTP
  layers' (each tied copy after the tensor it copies)."""
  D, V = cfg.hidden_size, cfg.vocab_size
  embed = _copy("model.embed_tokens.weight", (V, D), ("params", "embed", "embedding"), ())
  head = _linear("lm_head.weight", (V, D), ("params", "lm_head", "kernel"), ())
  layer = functools.partial(_layer_entries, cfg, hub_experts=hub_experts,
                            rope_interleave=rope_interleave)
  entries = [embed]
  for i in range(cfg.num_hidden_layers):
    kind = "dense_layers" if i < cfg.first_k_dense_replace else "moe_layers"
    j = i if kind == "dense_layers" else i - cfg.first_k_dense_replace
    entries += layer(f"model.layers.{i}.", ("params", kind), ("router", kind), (j,),
                     moe=kind == "moe_layers")
  entries += [_copy("model.norm.weight", (D,), ("params", "final_norm", "scale"), ()), head]
  for k in range(cfg.num_nextn_predict_layers):
    hf, p = f"model.layers.{cfg.num_hidden_layers + k}.", ("params", "mtp_layers")
    entries += [
        embed._replace(name=hf + "embed_tokens.weight", tied=True),
        _copy(hf + "enorm.weight", (D,), p + ("enorm", "scale"), (k,)),
        _copy(hf + "hnorm.weight", (D,), p + ("hnorm", "scale"), (k,)),
        _linear(hf + "eh_proj.weight", (D, 2 * D), p + ("eh_proj", "kernel"), (k,)),
        *layer(hf, p + ("block",), ("router", "mtp_layers", "block"), (k,), moe=True),
        _copy(hf + "shared_head.norm.weight", (D,), p + ("norm", "scale"), (k,)),
        head._replace(name=hf + "shared_head.head.weight", tied=True)]
  return entries


def _layer_entries(cfg: ModelConfig, hf: str, p: Path, r: Path, j: tuple[int], *, moe: bool,
                   hub_experts: bool, rope_interleave: bool) -> list[_Entry]:
  """One decoder layer's tensors (HF prefix `hf` = 'model.layers.{i}.'): k2jax Block params under
  `p`, its router bias under `r`, at index `j` of the stack."""
  D, H = cfg.hidden_size, cfg.num_attention_heads
  dn, dr, dv, kv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  ql = cfg.q_lora_rank
  rope = _rope_rows(dr, rope_interleave)
  q_rows = np.arange(H * (dn + dr)).reshape(H, dn + dr)
  q_rows[:, dn:] = q_rows[:, dn:][:, rope]
  q_rows = q_rows.reshape(-1)
  kv_rows = np.concatenate([np.arange(kv), kv + rope])
  a = p + ("attn",)
  if ql is None:
    entries = [_linear(hf + "self_attn.q_proj.weight", (H * (dn + dr), D),
                       a + ("q_proj", "kernel"), j, q_rows)]
  else:
    entries = [
        _linear(hf + "self_attn.q_a_proj.weight", (ql, D), a + ("q_a", "kernel"), j),
        _copy(hf + "self_attn.q_a_layernorm.weight", (ql,), a + ("q_a_norm", "scale"), j),
        _linear(hf + "self_attn.q_b_proj.weight", (H * (dn + dr), ql), a + ("q_b", "kernel"),
                j, q_rows)]
  entries += [
      _linear(hf + "self_attn.kv_a_proj_with_mqa.weight", (kv + dr, D), a + ("kv_a", "kernel"),
              j, kv_rows),
      _copy(hf + "self_attn.kv_a_layernorm.weight", (kv,), a + ("kv_a_norm", "scale"), j),
      _linear(hf + "self_attn.kv_b_proj.weight", (H * (dn + dv), kv), a + ("kv_b", "kernel"), j),
      _linear(hf + "self_attn.o_proj.weight", (D, H * dv), a + ("o", "kernel"), j)]
  if moe:
    entries += _moe_entries(hf + "mlp.", p + ("moe",), r + ("moe",), j, D, cfg.n_routed_experts,
                            cfg.moe_intermediate_size, cfg.n_shared_experts, hub_experts)
  else:
    I = cfg.intermediate_size
    entries += [_linear(hf + f"mlp.{n}_proj.weight", (D, I) if n == "down" else (I, D),
                        p + ("mlp", n, "kernel"), j) for n in ("gate", "up", "down")]
  return entries + [
      _copy(hf + "input_layernorm.weight", (D,), p + ("attn_norm", "scale"), j),
      _copy(hf + "post_attention_layernorm.weight", (D,), p + ("ffn_norm", "scale"), j)]


def _moe_entries(hf: str, m: Path, r: Path, j: tuple[int], D: int, E: int, F: int, S: int,
                 hub_experts: bool) -> list[_Entry]:
  """Routed experts, router and shared experts of one MoE layer (HF prefix `hf` = '...mlp.')."""
  ex = m + ("experts",)
  if hub_experts:
    entries = []
    for e in range(E):
      entries += [
          _linear(f"{hf}experts.{e}.gate_proj.weight", (F, D), ex + ("gate",), j + (e,)),
          _linear(f"{hf}experts.{e}.up_proj.weight", (F, D), ex + ("up",), j + (e,)),
          _linear(f"{hf}experts.{e}.down_proj.weight", (D, F), ex + ("down",), j + (e,))]
  else:
    swap = lambda w: w.transpose(0, 2, 1)
    entries = [
        _Entry(hf + "experts.gate_up_proj", (E, 2 * F, D),
               ((ex + ("gate",), j), (ex + ("up",), j)),
               lambda w: (swap(w[:, :F]), swap(w[:, F:])),
               lambda g, u: swap(np.concatenate([g, u], axis=-1))),
        _Entry(hf + "experts.down_proj", (E, D, F), ((ex + ("down",), j),),
               lambda w: (swap(w),), swap)]
  entries += [_linear(hf + "gate.weight", (E, D), m + ("router", "kernel"), j),
              _copy(hf + "gate.e_score_correction_bias", (E,), r + ("e_score_correction_bias",), j)]
  for n in ("gate", "up", "down"):
    name, shape = f"{hf}shared_experts.{n}_proj.weight", (D, S * F) if n == "down" else (S * F, D)
    if S > 0:
      entries.append(_linear(name, shape, m + ("shared", n, "kernel"), j))
    else:  # transformers keeps a zero-width shared MLP; k2jax has no variable for it.
      entries.append(_Entry(name, shape, (), lambda w: (), lambda s=shape: np.zeros(s, np.float32)))
  return entries


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, np.ndarray]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = np.asarray(v)
  return flat


def _nest(flat: dict[Path, np.ndarray]) -> dict:
  tree: dict = {"params": {}, "router": {}}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree
