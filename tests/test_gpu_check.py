"""benchmarks/gpu_check.py in its CPU smoke mode, where grain and ml_collections cannot be
imported (a bare accelerator image has only jax, flax, optax, orbax, einops and absl)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
_CHILD = """
import runpy, sys
sys.modules["grain"] = None          # any import of them now fails
sys.modules["ml_collections"] = None
sys.path.insert(0, "benchmarks")
sys.argv = ["gpu_check.py", "--smoke", "--results=" + sys.argv[1]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


@pytest.mark.slow  # the whole script: about ten programs compiled (a minute on 2 idle cores).
def test_smoke_run_writes_its_section_without_grain_or_ml_collections(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n\nkept\n<!-- gpu_check:begin -->\nstale section\n"
                     "<!-- gpu_check:end -->\n")
  out = subprocess.run([sys.executable, "-c", _CHILD, str(results)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = results.read_text()
  # Its section is replaced in place, the rest of the file kept.
  assert text.startswith("# Results\n\nkept\n<!-- gpu_check:begin -->\n## GPU check")
  assert "SMOKE RUN" in text and "stale section" not in text and text.count("gpu_check:begin") == 1
  agree = dict(
      (name.strip(), float(err)) for name, err in
      (part.rsplit(" ", 1) for part in text.split("float32): ")[1].split(". QK")[0].split(", ")))
  assert set(agree) >= {"sort", "capacity", "ragged"}
  assert all(err < 1e-4 for err in agree.values()), agree
  assert "max logits (float32 model) against the CPU's: 0.0e+00" in text
  assert "MFU" in text and "tokens/s" in text
