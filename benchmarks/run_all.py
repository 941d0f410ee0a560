"""Runs every benchmark and rewrites benchmarks/RESULTS.md with their sections (`make bench`).

Each benchmark runs in its own process, one after another (they time things; never in parallel).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).parent
# (script, extra arguments); each prints its RESULTS.md section (from its first "## " line).
MARKDOWN_BENCHMARKS = [
    ("moe_dispatch.py", []),
    ("optimizer_step.py", []),
    ("decode.py", []),
    ("sharded_muon.py", []),
    ("compile_flags.py", []),
]


def section_of(stdout: str) -> str:
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("## "))
  return "\n".join(lines[start:]).strip()


def run(script: str, args: list[str]) -> str:
  print(f"running {script} ...", flush=True)
  out = subprocess.run([sys.executable, str(HERE / script), *args], check=True,
                       capture_output=True, text=True, env=os.environ).stdout
  return out


def main():
  sections = [section_of(run(script, ["--markdown", *args]))
              for script, args in MARKDOWN_BENCHMARKS]
  with tempfile.TemporaryDirectory() as d:
    results = pathlib.Path(d) / "RESULTS.md"
    run("train_throughput.py", [f"--results={results}"])
    sections.append(section_of(results.read_text()))
  header = (f"# Benchmarks\n\nWritten by `make bench` (benchmarks/run_all.py) on "
            f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores. Every "
            "ratio is measured side by side in one run; absolute times on these shared "
            "machines are noisy.\n")
  (HERE / "RESULTS.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")
  print("wrote", HERE / "RESULTS.md")


if __name__ == "__main__":
  main()
