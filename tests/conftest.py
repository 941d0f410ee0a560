"""Shared test setup: 8 simulated CPU devices (set before jax is imported), float32 defaults."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Issue 5 (scale-out) is in progress: these tests need the mesh integration of k2jax/train
# (sharded train state and step, FSDP/expert meshes in the loop), which has not landed yet.
# They stay in the tree and are collected again once it does.
collect_ignore = ["test_sharding_train.py", "test_multiprocess.py"]
