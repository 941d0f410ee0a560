"""k2jax.aot: the real train step (two layers of k2_small) and serving, compiled by the XLA TPU
compiler for a v5p:2x2x1 slice on this CPU host (libtpu's compile-only devices)."""

import importlib.util
import json
import math
import re
import subprocess
import sys

import jax
import pytest
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import aot, optim, presets, sharding
from k2jax.model import partitioning
from k2jax.paths import path_str
from k2jax.plan import memory_plan
from k2jax.train import aot as train_aot
from k2jax.train.state import TrainState

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu (requirements-test.txt: jax[tpu])")
TOPOLOGY = "v5p:2x2x1"
B, T = 8, 64


def small(**overrides):
  """Two layers of k2_small whose weight shards keep every minor dimension a multiple of 128
  (kv_a's 64 + 64): the TPU pads minor dimensions to 128, which plan.py does not model.
  capacity_factor 1: the dispatch buffers hold exactly the assignments (no padded FLOPs)."""
  return presets.get("k2_small", num_hidden_layers=2, vocab_size=1024, kv_lora_rank=64,
                     qk_rope_head_dim=64, dtype="bfloat16", moe_dispatch="capacity",
                     capacity_factor=1.0, **overrides)


def compile_train(cfg, layout):
  devices, chip = aot.topology(TOPOLOGY)
  mesh = aot.topology_mesh(layout, devices, TOPOLOGY)
  param_sh = partitioning.variable_shardings(cfg, mesh)["params"]
  tx = optim.muonclip(1e-3, model_config=cfg, param_shardings=param_sh)
  return train_aot.train_step_report(cfg, tx, mesh, chip, TOPOLOGY, batch_size=B, seq_len=T,
                               grad_clip=1.0, bias_update_rate=1e-3)


@pytest.mark.slow  # two full TPU compiles (code generation included): about a minute each.
@pytest.mark.parametrize("layout", [{"fsdp": 4}, {"fsdp": 2, "expert": 2}],
                         ids=["fsdp", "expert_parallel"])
def test_train_step_compiles_for_tpu(layout):
  cfg = small()
  r = compile_train(cfg, layout)
  assert r.fits and r.num_chips == 4 and r.total_bytes < r.chip.hbm_bytes
  # FLOPs, loops counted: the FLOP model plus the unmasked half of attention, Newton-Schulz and
  # the dispatch's padding rows (none without expert parallelism at capacity factor 1).
  assert set(r.extra_flops) == {"unmasked attention", "expert padding", "Newton-Schulz"}
  assert (r.extra_flops["expert padding"] > 0) == (layout.get("expert", 1) > 1)
  assert r.flops == pytest.approx(r.accounted_flops, rel=0.1)
  assert r.flops > 1.2 * r.model_flops  # the extras matter at this size: the test can fail.
  # Arguments: the sharded parameters and optimizer state of plan.py, plus the batch.
  plan = memory_plan(cfg, r.mesh, micro_batch=B, seq_len=T)
  batch_bytes = B * (T + 1) * 4 // math.prod(r.mesh[a] for a in sharding.BATCH_AXES)
  assert r.argument_bytes == pytest.approx(plan.params + plan.optimizer + batch_bytes, rel=0.1)
  # The optimizer state is laid out like the parameters: each Muon momentum and Adam moment
  # has its parameter's sharding (the compiled executable's own input shardings).
  state_sh = r.compiled.input_shardings[0][0]
  assert isinstance(state_sh, TrainState)
  is_sh = lambda s: isinstance(s, NamedSharding)
  param_specs = {path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
      state_sh.params, is_leaf=is_sh)}
  copies = {}
  for p, s in jax.tree_util.tree_leaves_with_path(state_sh.opt_state, is_leaf=is_sh):
    name = re.sub(r"^.*/(trace|mu|nu)/", "", path_str(p))
    if name in param_specs:
      copies.setdefault(name, []).append(s.spec)
  momenta = [n for n in copies if "experts" in n or "attn/q_b" in n]
  assert momenta and all(spec == param_specs[n] and spec != () for n in momenta
                         for spec in copies[n])
  assert all(spec == param_specs[n] for n, specs in copies.items() for spec in specs)
  # The routed experts' all-to-all exists exactly under expert parallelism.
  dispatch_a2a = [line for line in r.compiled.as_text().splitlines()
                  if " all-to-all(" in line and "moe/experts/shard_map" in line]
  assert bool(dispatch_a2a) == (layout.get("expert", 1) > 1)
  assert r.collective_bytes["all-to-all"] > 0 if dispatch_a2a else True
  # Estimates are labelled as such and positive.
  text = r.format()
  assert "estimated" in text and "not measured" in text
  assert 0 < r.mfu() <= 1 and r.times["step"] > 0
  json.dumps(r.to_dict())


def test_a_config_that_cannot_fit_reports_it():
  """32k-token sequences: one layer's [4, 32768, 32768] float32 logits alone are 16 GiB a chip,
  and the backward keeps several: the compiler refuses it, the report says so."""
  cfg = presets.get("k2_nano", num_hidden_layers=1, first_k_dense_replace=1,
                    max_position_embeddings=65536)
  devices, chip = aot.topology(TOPOLOGY)
  mesh = aot.topology_mesh({"fsdp": 4}, devices, TOPOLOGY)
  tx = optim.adamw(1e-3)
  r = train_aot.train_step_report(cfg, tx, mesh, chip, TOPOLOGY, batch_size=4, seq_len=65536,
                            muon=False)
  assert not r.fits and "memory" in r.error
  text = r.format()
  assert "does not fit:" in text and "\n" not in r.error
  assert r.to_dict()["fits"] is False


def test_serving_compiles_with_the_compressed_cache():
  cfg = small(param_dtype="bfloat16")
  devices, chip = aot.topology(TOPOLOGY)
  mesh = aot.topology_mesh({"fsdp": 2, "expert": 2}, devices, TOPOLOGY)
  context = 256
  r = aot.decode_report(cfg, mesh, chip, TOPOLOGY, batch=8, context=context)
  assert r.fits and r.tokens == 8
  # Arguments: bf16 weights split like training's, and the cache split over the batch axes:
  # 2 layers x 8 rows x 256 positions x (kv_lora + rope dims) bf16 over 4 chips.
  plan = memory_plan(cfg, r.mesh, micro_batch=8, seq_len=8)
  cache = 2 * 8 * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 // 4
  assert r.argument_bytes == pytest.approx(plan.params + cache, rel=0.1)
  assert r.tokens_per_s_per_chip() > 0
  # One long row: its positions are split instead (a replicated 128k-token K2 cache is 9 GB).
  mesh_shape = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
  assert aot.cache_spec((2, 1, 256, 64), mesh_shape) == P(None, None, ("fsdp", "expert"), None)
  assert aot.cache_spec((2, 8, 256, 64), mesh_shape) == P(None, ("fsdp", "expert"), None, None)


@pytest.mark.slow  # two TPU compiles of a prefill.
def test_early_report_reads_the_same_numbers_from_the_compiler_dumps():
  """early=True stops at buffer assignment (K2's TPU code generation takes most of its compile):
  the dumped buffer assignment and optimized HLO give what the finished executable reports."""
  cfg = small(param_dtype="bfloat16")
  devices, chip = aot.topology(TOPOLOGY)
  mesh = aot.topology_mesh({"fsdp": 2, "expert": 2}, devices, TOPOLOGY)
  full = aot.prefill_report(cfg, mesh, chip, TOPOLOGY, batch=8, prompt_len=64, context=128)
  early = aot.prefill_report(cfg, mesh, chip, TOPOLOGY, batch=8, prompt_len=64, context=128,
                             early=True)
  assert (full.until, early.until) == ("code generation", "buffer assignment")
  for field in ("argument_bytes", "output_bytes", "alias_bytes", "flops", "collective_bytes"):
    assert getattr(early, field) == getattr(full, field), field
  # Code generation adds some scratch to the temporaries (8.6 MB here, whatever the model).
  assert 0 <= full.temp_bytes - early.temp_bytes < 16 * 2**20
  assert early.largest_buffers == full.largest_buffers and full.largest_buffers


def test_bad_topology_and_mesh_are_one_line_errors(monkeypatch):
  for name, match in [("v5p:3x3x3", "topology 'v5p:3x3x3': .*not divisible"),
                      ("tpu9:2x2", "generation one of v5p, v6e, v5e"),
                      ("v5p-7", "unknown slice")]:
    with pytest.raises(ValueError, match=match) as e:
      aot.topology(name)
    assert "\n" not in str(e.value)
  devices, _ = aot.topology(TOPOLOGY)
  with pytest.raises(ValueError, match=r"config.mesh needs 8 devices but v5p:2x2x1 has 4 chips"):
    aot.topology_mesh({"fsdp": 8}, devices, TOPOLOGY)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(ValueError, match=r"libtpu package: pip install 'jax\[tpu\]==0\."):
    aot.topology(TOPOLOGY)


def test_named_slices_and_split_physical_axes():
  assert aot.topology_name("v5p-128") == "v5p:4x4x4"
  assert aot.topology_name("v6e-256") == "v6e:16x16"
  devices, chip = aot.topology("v5p-16")  # 2x2x2: 8 chips
  assert len(devices) == 8 and chip.name == "TPU v5p"
  mesh = aot.topology_mesh({"fsdp": 2, "expert": 4}, devices)  # 4 = 2 x 2 physical axes
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  # 8 x 8 on a 4x4x4 torus: 8 is no product of physical axis sizes; a physical axis is split.
  devices, _ = aot.topology("v5p:4x4x4")
  with pytest.raises(NotImplementedError):
    mesh_utils.create_device_mesh((1, 8, 8, 1), devices)
  mesh = aot.topology_mesh({"fsdp": 8, "expert": 8}, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
  assert len({d.id for d in mesh.devices.flat}) == 64


def test_cli_one_line_error_for_a_bad_topology(tmp_path):
  out = subprocess.run([sys.executable, "experiments/aot.py", "--topology=v5p:3x3x3"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith("error: topology 'v5p:3x3x3':")
