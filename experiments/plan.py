r"""Per-device memory of a training step for a config on a mesh, and whether it fits.

  python experiments/plan.py                      # kimi_k2 on 256, 1024 and 2048 devices
  python experiments/plan.py --preset=k2_small --mesh=1,8,1,1 --micro_batch_per_device=2 \
      --seq_len=512

--mesh=data,fsdp,expert,tensor (repeatable); --micro_batch_per_device sequences per device per
micro-step (grad_accum micro-steps make an optimizer step). The model (k2jax.plan) is exact
for parameters, optimizer state and gradients (the real shapes and sharding rules) and a count of
the saved activations; tests/test_plan.py checks it against XLA's compiled memory analysis.

Against the K2 report's layout. K2 trained on H800s (80 GB) with 16-way pipeline parallelism,
16-way expert parallelism and ZeRO-1 data parallelism: each group of 256 GPUs holds the model,
bf16 weights and fp32 gradient buffers, about 30 GB of states per GPU, with activations kept
small by recomputation, FP8 storage and CPU offload. k2jax has no pipeline parallelism; its
256-device layout is fsdp=16 x expert=16, FSDP (ZeRO-3) in the pipeline's place, which splits
parameters, gradients and optimizer state the same 256 ways (experts) and 16 ways (the rest).
With the defaults printed here (float32 parameters, Muon momentum and gradients, bf16 matmuls,
remat "full", capacity dispatch) that is 57 GB of states per device and 106 GB in all: it fits a
141 GB H200, not an 80 GB H800. bf16 parameters bring it to 84 GB. What K2-on-H800 would need
from k2jax: more FSDP ways (fsdp=64 at 1024 devices cuts the states 4x: 63 GB in all), or
tensor=8 (1x2x16x8 on 256 devices: 82 GB; 1x16x16x8 on 2048: 26 GB); a fused (flash) attention,
since the [H, T, T] logits and probabilities of one layer are 8.6 GB per 4096-token sequence at
64 heads, twice that with their cotangents, most of the 39 GB of activations; the ragged
all_to_all of GPUs instead of the padded CPU exchange (dropless padding multiplies the routed
rows by the expert ways: 83 GB of activations with moe_dispatch=sort); and pipeline stages,
which k2jax does not have, to stop re-gathering every layer's weights for every micro-batch.
"""

from __future__ import annotations

from absl import app, flags

from k2jax import presets, sharding
from k2jax.plan import DEVICES, format_plan, memory_plan

_PRESET = flags.DEFINE_string("preset", "kimi_k2", "k2jax preset.")
_MESH = flags.DEFINE_multi_string(
    "mesh", ["1,16,16,1", "1,2,16,8", "4,16,16,1", "1,64,16,1", "8,16,16,1", "1,128,16,1",
             "1,16,16,8"],
    "data,fsdp,expert,tensor sizes (repeatable).")
_MICRO = flags.DEFINE_integer("micro_batch_per_device", 1,
                              "Sequences per device per micro-step (the global micro-batch is "
                              "this times data x fsdp x expert).")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence (K2: 4096).")
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Micro-steps per optimizer step.")
_OPT = flags.DEFINE_enum("optimizer", "muonclip", ["muonclip", "muon", "adamw"], "Optimizer.")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "ModelConfig.remat.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "ModelConfig.dtype (matmuls).")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "ModelConfig.param_dtype.")
_DISPATCH = flags.DEFINE_enum("moe_dispatch", "capacity", ["sort", "capacity", "ragged"],
                              "ModelConfig.moe_dispatch.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = presets.get(_PRESET.value, remat=_REMAT.value, dtype=_DTYPE.value,
                    param_dtype=_PARAM_DTYPE.value, moe_dispatch=_DISPATCH.value)
  print(f"{_PRESET.value}: {_OPT.value}, remat {cfg.remat}, matmuls {cfg.dtype}, params "
        f"{cfg.param_dtype}, dispatch {cfg.moe_dispatch}, {_SEQ.value} tokens/sequence, "
        f"GB per device; devices: {', '.join(DEVICES)}")
  for text in _MESH.value:
    sizes = [int(v) for v in text.split(",")]
    if len(sizes) != len(sharding.MESH_AXES):
      raise app.UsageError(f"--mesh={text}: give {len(sharding.MESH_AXES)} sizes "
                           f"({','.join(sharding.MESH_AXES)})")
    mesh = dict(zip(sharding.MESH_AXES, sizes))
    batch_ways = mesh["data"] * mesh["fsdp"] * mesh["expert"]
    plan = memory_plan(cfg, mesh, _MICRO.value * batch_ways, _SEQ.value, _OPT.value,
                       _ACCUM.value)
    print(f"{batch_ways * mesh['tensor']:5d} devices | "
          + format_plan(plan))


if __name__ == "__main__":
  app.run(main)
