"""`make bench` rewrites the sections its benchmarks print and keeps the others of RESULTS.md."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
import run_all  # noqa: E402

OLD = """
## Optimizer step (benchmarks/optimizer_step.py)

old table

## Compiled for TPU (experiments/aot.py)

by hand
<!-- gpu_check:begin -->
## GPU check (benchmarks/gpu_check.py)

gpu numbers
<!-- gpu_check:end -->

## Decode (benchmarks/decode.py)

old decode
"""


def test_merge_replaces_benchmark_sections_in_place_and_keeps_the_rest():
  new = ["## Decode (benchmarks/decode.py)\n\nnew decode\n",
         "## Optimizer step (benchmarks/optimizer_step.py)\n\nnew table",
         "## Compile flags (benchmarks/compile_flags.py)\n\nnew section"]
  got = run_all.merge(OLD, "# Benchmarks\n\nheader\n", new)
  assert got == """# Benchmarks

header

## Optimizer step (benchmarks/optimizer_step.py)

new table

## Compiled for TPU (experiments/aot.py)

by hand
<!-- gpu_check:begin -->
## GPU check (benchmarks/gpu_check.py)

gpu numbers
<!-- gpu_check:end -->

## Decode (benchmarks/decode.py)

new decode

## Compile flags (benchmarks/compile_flags.py)

new section
"""


def test_merging_the_results_file_with_its_own_sections_keeps_every_section():
  text = (pathlib.Path(run_all.HERE) / "RESULTS.md").read_text()
  parts = text.split("\n## ")
  # The first section and the training-throughput one (its end marker printed with it), as if
  # the benchmarks printed them again.
  mine = ["## " + parts[1]] + ["## " + p for p in parts if p.startswith("Training throughput")]
  got = run_all.merge(text, "# Benchmarks\n", mine)
  assert got.count("train_throughput:end") == text.count("train_throughput:end") == 1
  titles = lambda t: [ln for ln in t.splitlines() if ln.startswith("## ")]
  assert titles(got) == titles(text) and got.count("gpu_check:begin") == 1
