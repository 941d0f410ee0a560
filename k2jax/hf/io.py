"""Hugging Face checkpoint directories <-> k2jax: config.json plus safetensors, single or sharded.

`load` reads both config styles (hub `rope_scaling` with model_type kimi_k2 / deepseek_v3, and
transformers 5.x `rope_parameters`), both expert layouts (hub per-expert and fused names), and the
FP8 e4m3 weights of the official K2 / DeepSeek-V3 releases, dequantized with their float32
`weight_scale_inv` (one scale per 128x128 block, `quantization_config.weight_block_size`).
Tensors stream one at a time into preallocated parameters, so host memory peaks near the final
parameters' size. A tensor is read with plain positional reads at the offsets of the safetensors
header (never pickle): safetensors' own numpy reader cannot return float8 arrays, and the pages of
its memory map would stay resident for the whole file.

`save` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads, with a
K2-format tokenizer's files next to the weights when given one; `load_tokenizer` reads them back.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from k2jax.config import DTYPES, ModelConfig
from k2jax.data import tokenizers
from k2jax.hf.config import config_from_hf, config_to_hf
from k2jax.hf.state_dict import from_torch_state_dict, to_torch_state_dict

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ARCHITECTURES = ("DeepseekV3ForCausalLM",)
_SCALE = "_scale_inv"
_FLOATS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16)}
_FP8 = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class _Tensor(NamedTuple):
  """Where one tensor lies in a safetensors file."""

  file: pathlib.Path
  name: str
  dtype: str  # safetensors' name: F32, BF16, F8_E4M3, ...
  shape: tuple[int, ...]
  start: int  # absolute byte offset of the data.
  nbytes: int


def load(path: str | pathlib.Path, dtype=None,
         num_nextn_predict_layers: int | None = None) -> tuple[ModelConfig, dict]:
  """(cfg, variables) from a local HF DeepseekV3 / Kimi K2 directory; variables as numpy arrays.

  `dtype` (float32 / bfloat16 / float16) sets the parameter and compute dtypes; by default the
  config's `dtype` (or `torch_dtype`), else float32. `num_nextn_predict_layers` overrides the
  config's count of multi-token-prediction layers (0: the main model alone; the checkpoint's MTP
  layers are skipped with a warning). Raises a one-line ValueError naming the file or tensor at
  fault; nothing is returned half-loaded.
  """
  path = pathlib.Path(path)
  hf = _read_json(path / CONFIG)
  archs = hf.get("architectures") or list(ARCHITECTURES)
  if not set(archs) & set(ARCHITECTURES):
    raise ValueError(f"{path / CONFIG}: architecture {archs[0]!r} is unsupported (k2jax loads "
                     f"{', '.join(ARCHITECTURES)})")
  name = _dtype_name(dtype if dtype is not None else
                     hf.get("dtype") or hf.get("torch_dtype") or "float32",
                     strict=dtype is not None)
  try:
    mtp = {} if num_nextn_predict_layers is None else {
        "num_nextn_predict_layers": num_nextn_predict_layers}
    cfg = config_from_hf(hf, dtype=name, param_dtype=name, **mtp)
  except ValueError as e:
    raise ValueError(f"{path / CONFIG}: {e}") from e
  block = tuple((hf.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
  state_dict = _lazy_state_dict(_checkpoint_tensors(path), block)
  variables = from_torch_state_dict(cfg, state_dict,
                                    rope_interleave=hf.get("rope_interleave", True))
  return cfg, variables


def save(path: str | pathlib.Path, cfg: ModelConfig, variables: dict,
         max_shard_size: int | str = "5GB", hub_names: bool = False,
         hf_config: dict | None = None, tokenizer: tokenizers.Tokenizer | None = None) -> None:
  """Writes config.json and safetensors (with an index when over `max_shard_size`) to `path`.

  Tensors keep the parameters' dtype (the router bias stays float32); names are transformers'
  (fused experts) or, with `hub_names`, the hub's per-expert ones. A `tokenizer` writes its files
  (a K2-format one: tiktoken.model, tokenizer_config.json, chat_template.jinja) and its BOS / EOS
  ids into config.json; `hf_config` adds fields to config.json last. Earlier model files in `path`
  are replaced.
  """
  limit = _parse_size(max_shard_size)
  token_ids = {}
  if tokenizer is not None:
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f"k2jax.hf.save: the tokenizer has {tokenizer.vocab_size} ids, more than "
                       f"the model's vocab_size {cfg.vocab_size}")
    token_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
  state_dict = to_torch_state_dict(cfg, variables, hub_names=hub_names)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for old in [*path.glob("model-*-of-*.safetensors"), path / SINGLE, path / INDEX]:
    old.unlink(missing_ok=True)
  shards, size = [{}], 0
  for name, w in state_dict.items():
    if shards[-1] and size + w.nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = w
    size += w.nbytes
  files = ([SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for file, shard in zip(files, shards):
    save_file(shard, path / file, metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(w.nbytes for w in state_dict.values())},
             "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
    (path / INDEX).write_text(json.dumps(index, indent=2))
  if tokenizer is not None:
    tokenizer.save(path)
  (path / CONFIG).write_text(json.dumps(
      {**config_to_hf(cfg), "dtype": cfg.param_dtype, **token_ids, **(hf_config or {})}, indent=2))


def load_tokenizer(path: str | pathlib.Path) -> tokenizers.Tokenizer | None:
  """The tokenizer of a checkpoint directory (a Kimi K2 release, or one `save` wrote with a
  tokenizer); None when it holds none."""
  return tokenizers.from_dir(path)


class _LazyTensor:
  """A checkpoint tensor read (and FP8-dequantized) only when numpy asks for its values."""

  def __init__(self, tensor: _Tensor, scale: _Tensor | None, block: tuple[int, int]):
    self.tensor, self.scale, self.block = tensor, scale, block

  def __array__(self, dtype=None, copy=None):
    w = _read(self.tensor)
    if self.scale is not None:
      w = _dequantize(w, _read(self.scale), self.block, self.tensor.name)
    return w if dtype is None else w.astype(dtype)


def _lazy_state_dict(tensors: dict[str, _Tensor], block: tuple[int, int]) -> dict:
  """name -> _LazyTensor, each FP8 weight paired with its `<name>_scale_inv`."""
  state_dict = {}
  for name, t in tensors.items():
    if name.endswith(_SCALE):
      if name[:-len(_SCALE)] not in tensors:
        raise ValueError(f"tensor {name!r} has no weight {name[:-len(_SCALE)]!r} to scale")
      continue
    scale = tensors.get(name + _SCALE)
    if (t.dtype in _FP8) != (scale is not None):
      raise ValueError(f"tensor {name!r} has dtype {t.dtype} and "
                       f"{'a' if scale is not None else 'no'} {name + _SCALE!r}: FP8 weights "
                       "(F8_E4M3) and block scales come in pairs")
    state_dict[name] = _LazyTensor(t, scale, block)
  return state_dict


def _dequantize(w_RC: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                name: str) -> np.ndarray:
  """float32 weights: each (br x bc) block of the FP8 tensor times its scale."""
  (R, C), (br, bc) = w_RC.shape[-2:], block
  want = w_RC.shape[:-2] + (-(-R // br), -(-C // bc))
  if scale_inv.shape != want:
    raise ValueError(f"tensor {name + _SCALE!r} has shape {scale_inv.shape}, expected {want} "
                     f"for {br}x{bc} blocks of {name!r} {w_RC.shape}")
  scale_RC = np.repeat(np.repeat(scale_inv.astype(np.float32), br, axis=-2)[..., :R, :],
                       bc, axis=-1)[..., :C]
  out = w_RC.astype(np.float32)
  out *= scale_RC
  return out


def _read(t: _Tensor) -> np.ndarray:
  dtype = _FLOATS.get(t.dtype) or _FP8.get(t.dtype)
  if dtype is None:
    raise ValueError(f"tensor {t.name!r} has dtype {t.dtype}; expected one of "
                     f"{', '.join([*_FLOATS, *_FP8])}")
  count = math.prod(t.shape)
  if count * dtype.itemsize != t.nbytes:
    raise ValueError(f"tensor {t.name!r} in {t.file}: {t.nbytes} bytes for shape {t.shape} "
                     f"of {t.dtype}")
  with open(t.file, "rb") as f:
    f.seek(t.start)
    data = np.fromfile(f, dtype, count)
  if data.size != count:
    raise ValueError(f"tensor {t.name!r}: {t.file} is truncated")
  return data.reshape(t.shape)


def _read_header(file: pathlib.Path) -> dict[str, _Tensor]:
  """The tensors of one safetensors file, checked against the file's size."""
  if not file.is_file():
    raise ValueError(f"{file}: no such checkpoint file")
  size = file.stat().st_size
  with open(file, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 0 or 8 + n > size:
      raise ValueError(f"{file}: truncated safetensors file (no complete header)")
    try:
      header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      tensors = {name: _Tensor(file, name, h["dtype"], tuple(h["shape"]),
                               8 + n + h["data_offsets"][0],
                               h["data_offsets"][1] - h["data_offsets"][0])
                 for name, h in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
      raise ValueError(f"{file}: not a safetensors file (bad header: {e})") from e
  for t in sorted(tensors.values(), key=lambda t: t.start):
    if t.start + t.nbytes > size:
      raise ValueError(f"{file}: truncated safetensors file (tensor {t.name!r} ends at byte "
                       f"{t.start + t.nbytes}, the file has {size})")
  return tensors


def _checkpoint_tensors(path: pathlib.Path) -> dict[str, _Tensor]:
  """All tensors of the directory's single file or index-sharded set."""
  if (path / INDEX).exists():
    weight_map = _read_json(path / INDEX).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{path / INDEX}: no 'weight_map'")
    headers = {f: _read_header(path / f) for f in sorted(set(weight_map.values()))}
    for name, f in weight_map.items():
      if name not in headers[f]:
        raise ValueError(f"tensor {name!r}: {INDEX} puts it in {f}, which lacks it")
    return {name: headers[f][name] for name, f in weight_map.items()}
  if (path / SINGLE).exists():
    return _read_header(path / SINGLE)
  raise ValueError(f"{path}: no {SINGLE} or {INDEX} (k2jax reads safetensors only)")


def _read_json(file: pathlib.Path) -> dict:
  try:
    d = json.loads(file.read_text())
  except FileNotFoundError as e:
    raise ValueError(f"{file}: not found") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON ({e})") from e
  if not isinstance(d, dict):
    raise ValueError(f"{file}: expected a JSON object")
  return d


def _dtype_name(dtype, strict: bool) -> str:
  """float32 / bfloat16 / float16 from a name or dtype; others fail (strict) or give float32."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name in DTYPES:
    return name
  if strict:
    raise ValueError(f"k2jax.hf.load: dtype must be one of {DTYPES}, got {dtype!r}")
  return "float32"


def _parse_size(size: int | str) -> int:
  """Bytes from an int or a string such as '5GB' or '200MiB'."""
  if isinstance(size, int) and size > 0:
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
  if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
    raise ValueError(f"max_shard_size must be a positive size like '5GB', got {size!r}")
  return int(float(m.group(1)) * _UNITS[m.group(2)])
