"""k2jax.hf.load / save of checkpoint directories: logits parity with transformers, FP8, errors.

Directories are written by transformers' `save_pretrained` (hub per-expert names), rewritten to the
hub's legacy config style, sharded, or quantized to FP8 here; nothing is downloaded.
"""

import functools
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import xla_flags
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file
from test_hf_parity import CASES, _hf_model, _hf_mtp, _tokens

import k2jax.hf
from k2jax.config import ModelConfig
from k2jax.data.tokenizers import ByteTokenizer
from k2jax.hf import from_torch_state_dict
from k2jax.model import Transformer, abstract_variables
from k2jax.train import build_optimizer, default_config, init_state, model_config
from k2jax.train.checkpoint import Checkpointer


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, variables, tokens_BT):
  return Transformer(cfg).apply(variables, tokens_BT)[0]


@functools.cache
def _model_and_logits(name: str):
  model = _hf_model(CASES[name])
  with torch.no_grad():
    ref = model(torch.as_tensor(_tokens(CASES[name]))).logits.numpy()
  return model, ref


def _rel_err(got, ref) -> float:
  return float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))


def _to_legacy_config(path: pathlib.Path, model_type: str) -> None:
  """Rewrites a transformers 5.x config.json in the hub's style (rope_scaling + rope_theta)."""
  d = json.loads((path / "config.json").read_text())
  rope = dict(d.pop("rope_parameters"))
  d["rope_theta"] = rope.pop("rope_theta")
  kind = rope.pop("rope_type")
  d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
  d["torch_dtype"] = d.pop("dtype")
  d.update(model_type=model_type, architectures=["DeepseekV3ForCausalLM"])
  (path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("layout", ["transformers", "legacy_config", "sharded"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_load_matches_transformers(name, layout, tmp_path):
  model, ref = _model_and_logits(name)
  model.save_pretrained(tmp_path, max_shard_size="20KB" if layout == "sharded" else "5GB")
  if layout == "legacy_config":
    _to_legacy_config(tmp_path, "kimi_k2" if CASES[name].q_lora_rank else "deepseek_v3")
  assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded")
  cfg, variables = k2jax.hf.load(tmp_path)
  assert cfg == CASES[name]
  assert _rel_err(_forward(cfg, variables, _tokens(cfg)), ref) <= 1e-5


def _from_pretrained(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")


@pytest.mark.parametrize("hub_names", [False, True])
def test_save_loads_in_transformers(hub_names, tmp_path):
  name = "qlora_groups_yarn_cos"
  model, ref = _model_and_logits(name)
  variables = from_torch_state_dict(CASES[name], model.state_dict())
  assert np.abs(variables["router"]["moe_layers"]["moe"]["e_score_correction_bias"]).min() > 0
  k2jax.hf.save(tmp_path / "single", CASES[name], variables, hub_names=hub_names)
  k2jax.hf.save(tmp_path / "sharded", CASES[name], variables, max_shard_size="30KB",
                hub_names=hub_names)
  assert (tmp_path / "single" / "model.safetensors").exists()
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  for sub in ("single", "sharded"):
    with torch.no_grad():
      got = _from_pretrained(tmp_path / sub)(torch.as_tensor(_tokens(CASES[name]))).logits
    np.testing.assert_array_equal(got.numpy(), ref)
    # And back: k2jax reads its own output bit for bit.
    cfg, back = k2jax.hf.load(tmp_path / sub)
    assert cfg == CASES[name]
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_save_bfloat16_round_trip(tmp_path):
  cfg = CASES["plain_q_groups"].replace(param_dtype="bfloat16", dtype="bfloat16")
  variables = from_torch_state_dict(cfg, _model_and_logits("plain_q_groups")[0].state_dict())
  k2jax.hf.save(tmp_path, cfg, variables)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  got_cfg, back = k2jax.hf.load(tmp_path)
  assert got_cfg == cfg
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert k2jax.hf.load(tmp_path, dtype="float32")[0].param_dtype == "float32"


FP8_BLOCK = (16, 8)  # small blocks so the tiny weights span several, with ragged edges.
FP8_MAX = 448.0


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """DeepSeek-style block FP8: (e4m3 weight, float32 scale_inv per block) with w ~ q * s."""
  (R, C), (br, bc) = w.shape, FP8_BLOCK
  s = torch.zeros(-(-R // br), -(-C // bc))
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      s[i, j] = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max() / FP8_MAX
  full = s.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
  return (w / full).to(torch.float8_e4m3fn), s


def _write_release(path: pathlib.Path, cfg: ModelConfig, sd: dict, fp8: bool) -> dict:
  """A directory laid out as the official K2 / DS-V3 releases: hub per-expert names, the hub's
  config style and, with `fp8`, every linear weight in FP8 with its block scales.

  Returns the (dequantized, in torch) state dict that the loader must reproduce.
  """
  sd = {k: torch.as_tensor(np.asarray(v)).clone().contiguous() for k, v in sd.items()}
  hub = {}
  for k, v in sd.items():  # hub names: one tensor per expert, as the official checkpoints.
    stem = k[: k.rfind(".") + 1]
    if k.endswith("experts.gate_up_proj"):
      F = cfg.moe_intermediate_size
      for e in range(cfg.n_routed_experts):
        hub[f"{stem}{e}.gate_proj.weight"] = v[e, :F].contiguous()
        hub[f"{stem}{e}.up_proj.weight"] = v[e, F:].contiguous()
    elif k.endswith("experts.down_proj"):
      for e in range(cfg.n_routed_experts):
        hub[f"{stem}{e}.down_proj.weight"] = v[e].contiguous()
    else:
      hub[k] = v
  out, dequantized = {}, {}
  for k, v in hub.items():
    if fp8 and v.ndim == 2 and "_proj" in k:  # not embeddings, norms, router or (shared) heads.
      q, s = _quantize(v)
      out[k], out[k + "_scale_inv"] = q, s
      full = s.repeat_interleave(FP8_BLOCK[0], 0)[:v.shape[0]]
      dequantized[k] = q.float() * full.repeat_interleave(FP8_BLOCK[1], 1)[:, :v.shape[1]]
    else:
      out[k] = dequantized[k] = v
  torch_save_file(out, path / "model.safetensors", metadata={"format": "pt"})
  hf = {**transformers.DeepseekV3Config(**k2jax.hf.config_to_hf(cfg)).to_dict(),
        "dtype": "bfloat16"}
  if fp8:
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                 "quant_method": "fp8", "weight_block_size": list(FP8_BLOCK)}
  (path / "config.json").write_text(json.dumps(hf))
  _to_legacy_config(path, "deepseek_v3")
  return dequantized


def _with_mtp(name: str):
  """(cfg with two MTP layers, HF model, its state dict with DeepSeek-V3's MTP tensors)."""
  cfg = CASES[name].replace(num_nextn_predict_layers=2)
  model = _hf_model(cfg)
  return cfg, model, {**model.state_dict(), **_hf_mtp(model)[1]}


def test_fp8_block_quantized_weights_are_dequantized(tmp_path, caplog):
  """An FP8 release with MTP layers (eh_proj and the MTP blocks quantized too) loads to the
  dequantized weights; with num_nextn_predict_layers=0 its MTP layers are skipped, warned once."""
  cfg, model, sd = _with_mtp("qlora_yarn")
  dequantized = _write_release(tmp_path, cfg, sd, fp8=True)
  with safe_open(tmp_path / "model.safetensors", "pt") as f:
    assert "model.layers.3.eh_proj.weight_scale_inv" in f.keys()
  got_cfg, got = k2jax.hf.load(tmp_path)
  want_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  assert got_cfg == want_cfg
  want = from_torch_state_dict(want_cfg, dequantized)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # The quantization was real: the weights moved, but only by FP8 rounding.
  exact = from_torch_state_dict(want_cfg, sd)
  for path in (("dense_layers", "attn", "q_b", "kernel"), ("mtp_layers", "eh_proj", "kernel")):
    a, b = (np.asarray(functools.reduce(dict.get, ("params",) + path, v), np.float32)
            for v in (got, exact))
    assert 0 < np.max(np.abs(a - b)) / np.max(np.abs(b)) < 0.1
  with caplog.at_level(logging.WARNING):
    plain_cfg, plain = k2jax.hf.load(tmp_path, num_nextn_predict_layers=0)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "model.layers.2, model.layers.3" in warnings[0]
  assert plain_cfg == want_cfg.replace(num_nextn_predict_layers=0)
  assert "mtp_layers" not in plain["params"] and "mtp_layers" not in plain["router"]
  np.testing.assert_array_equal(plain["params"]["lm_head"]["kernel"],
                                got["params"]["lm_head"]["kernel"])


def test_deepseek_v3_shaped_checkpoint_with_mtp_round_trips(tmp_path):
  """A tiny DeepSeek-V3-shaped release (hub names and config style, group-limited routing, MTP
  layers with their embedding and head copies) loads and saves back bit for bit."""
  cfg, _, sd = _with_mtp("qlora_groups_yarn_cos")
  release = _write_release(tmp_path, cfg, sd, fp8=False)
  got_cfg, variables = k2jax.hf.load(tmp_path, dtype="float32")
  assert got_cfg == cfg
  k2jax.hf.save(tmp_path / "out", got_cfg, variables, hub_names=True, max_shard_size="40KB")
  files = sorted((tmp_path / "out").glob("*.safetensors"))
  assert len(files) > 1
  back = {k: v for f in files for k, v in load_file(f).items()}
  assert sorted(back) == sorted(release)
  for k, v in release.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  assert json.loads((tmp_path / "out" / "config.json").read_text())[
      "num_nextn_predict_layers"] == 2


def _write(path: pathlib.Path, tensors: dict, config: dict) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(config))
  return path


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
  """(tensors, config) of a valid directory, to be damaged one way per case."""
  cfg = CASES["qlora_yarn"]
  path = tmp_path_factory.mktemp("good")
  _model_and_logits("qlora_yarn")[0].save_pretrained(path)
  cfg_dict = json.loads((path / "config.json").read_text())
  assert k2jax.hf.load(path)[0] == cfg
  return load_file(path / "model.safetensors"), cfg_dict


def test_bad_directories_raise_clear_errors(good_checkpoint, tmp_path):
  tensors, config = good_checkpoint
  name = "model.layers.0.self_attn.kv_b_proj.weight"
  cases = {
      "missing": ({k: v for k, v in tensors.items() if k != name}, config,
                  rf"missing tensor '{name}'"),
      "shape": ({**tensors, name: tensors[name][:, :8]}, config,
                rf"'{name}' has shape \(64, 8\)"),
      "dtype": ({**tensors, name: tensors[name].astype(np.int32)}, config,
                rf"'{name}' has dtype I32"),
      "unexpected": ({**tensors, "model.layers.0.mlp.extra.weight": tensors[name]}, config,
                     r"unexpected tensor 'model.layers.0.mlp.extra.weight'"),
      "fp8_no_scale": ({**tensors, name: tensors[name].astype(ml_dtypes.float8_e4m3fn)}, config,
                       rf"'{name}' has dtype F8_E4M3 and no '{name}_scale_inv'"),
      "scale_no_weight": ({**tensors, "model.x.weight_scale_inv": np.ones((1, 1), np.float32)},
                          config, r"'model.x.weight_scale_inv' has no weight 'model.x.weight'"),
      "architecture": (tensors, {**config, "architectures": ["LlamaForCausalLM"]},
                       r"architecture 'LlamaForCausalLM' is unsupported"),
      "model_type": (tensors, {**config, "model_type": "llama", "architectures": None},
                     r"config.json: HF config model_type must be one of"),
  }
  for case, (t, c, match) in cases.items():
    with pytest.raises(ValueError, match=match):
      k2jax.hf.load(_write(tmp_path / case, t, c))
  # A truncated file names the file and the first tensor past its end.
  path = _write(tmp_path / "truncated", tensors, config)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[: len(data) - 100])
  with pytest.raises(ValueError, match=r"model.safetensors: truncated safetensors file \(tensor"):
    k2jax.hf.load(path)
  (path / "model.safetensors").write_bytes(data[:6])
  with pytest.raises(ValueError, match=r"truncated safetensors file \(no complete header\)"):
    k2jax.hf.load(path)
  (path / "model.safetensors").unlink()
  with pytest.raises(ValueError, match=r"no model.safetensors or model.safetensors.index.json"):
    k2jax.hf.load(path)
  # Indexes naming a missing shard, or a shard that does not hold the tensor.
  path = _write(tmp_path / "index", tensors, config)
  index = path / "model.safetensors.index.json"
  weight_map = {k: "model.safetensors" for k in tensors}
  index.write_text(json.dumps({"weight_map": {**weight_map, "lm_head.extra": "a.safetensors"}}))
  with pytest.raises(ValueError, match=r"a.safetensors: no such checkpoint file"):
    k2jax.hf.load(path)
  index.write_text(json.dumps({"weight_map": {**weight_map, "lm_head.extra": "model.safetensors"}}))
  with pytest.raises(ValueError, match=r"'lm_head.extra': .* puts it in model.safetensors, which"):
    k2jax.hf.load(path)
  with pytest.raises(ValueError, match=r"max_shard_size must be a positive size"):
    k2jax.hf.save(tmp_path / "out", CASES["qlora_yarn"], {}, max_shard_size="5 parsecs")


_RSS_CHILD = """
import json, pathlib, re, sys
import jax
import k2jax.hf
from k2jax.model import abstract_variables


def status(key):  # bytes; VmHWM is this image's peak (ru_maxrss would include the forked parent).
  return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


# Warm up what load does besides reading tensors (jax's CPU client, tracing the model's shapes).
config = json.loads((pathlib.Path(sys.argv[1]) / "config.json").read_text())
abstract_variables(k2jax.hf.config_from_hf(config))
before, peak_before = status("VmRSS"), status("VmHWM")
cfg, variables = k2jax.hf.load(sys.argv[1])
print(json.dumps({"before": before, "peak_before": peak_before, "peak": status("VmHWM"),
                  "params": sum(x.nbytes for x in jax.tree.leaves(variables))}))
"""


def test_load_streams_tensors_peak_rss(tmp_path):
  """Loading a ~100 MB checkpoint raises peak RSS by at most 1.3x its parameter bytes."""
  cfg = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048,
                    moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    n_routed_experts=32, num_experts_per_tok=2, first_k_dense_replace=1,
                    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                    v_head_dim=32, max_position_embeddings=256)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
                           abstract_variables(cfg))
  k2jax.hf.save(tmp_path, cfg, variables, max_shard_size="40MB")
  del variables
  env = {**os.environ, "XLA_FLAGS": xla_flags(None)}  # one device, as users run.
  out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path)], capture_output=True,
                       text=True, check=True, env=env)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["params"] > 90e6 and r["peak"] > r["peak_before"], r  # the peak is the load's.
  ratio = (r["peak"] - r["before"]) / r["params"]
  assert ratio <= 1.3, r


def test_export_of_a_training_workdir_loads_in_transformers(tmp_path):
  """experiments/export_hf.py on a workdir laid out as k2jax.train writes it."""
  spec = importlib.util.spec_from_file_location(
      "export_hf", pathlib.Path(__file__).parents[1] / "experiments" / "export_hf.py")
  export_hf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(export_hf)
  config = default_config()
  config.model.update(dict(hidden_size=32, num_hidden_layers=2, n_routed_experts=4,
                           num_experts_per_tok=2))
  config.data.tokenizer = "byte"
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  cfg = model_config(config, 257)
  tx, _ = build_optimizer(config, cfg)
  state = init_state(cfg, tx, seed=7)
  rng = np.random.default_rng(0)  # a non-zero router bias, as training leaves it.
  state = state.replace(router=jax.tree.map(
      lambda b: rng.normal(0, 0.1, b.shape).astype(np.float32), state.router))
  ckpt = Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
  ckpt.save(5, state, {})
  ckpt.close()
  out = export_hf.export(str(workdir), str(tmp_path / "hf"), max_shard_size="100KB")
  assert (out / "model.safetensors.index.json").exists()
  assert isinstance(k2jax.hf.load_tokenizer(out), ByteTokenizer)
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["eos_token_id"] == 256 and hf_config["bos_token_id"] is None
  tokens = np.random.default_rng(1).integers(0, 257, (2, 12))
  ours = _forward(cfg, {"params": state.params, "router": state.router}, tokens)
  with torch.no_grad():
    theirs = _from_pretrained(out)(torch.as_tensor(tokens)).logits.numpy()
  assert _rel_err(ours, theirs) <= 1e-5
