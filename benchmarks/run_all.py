"""Runs every benchmark and rewrites their sections of benchmarks/RESULTS.md (`make bench`).

Each benchmark runs in its own process, one after another (they time things; never in parallel).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
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


def merge(old: str, header: str, sections: list[str]) -> str:
  """`old` with its header and each "## " section a benchmark wrote replaced in place (matched by
  the title line); the sections written otherwise (experiments, the GPU check) are kept, with
  the HTML comment lines that mark them; sections with a new title go at the end."""
  fresh = {s.splitlines()[0]: s.strip() for s in sections}
  parts = re.split(r"(?m)^(?=## )", old)
  out = [header.strip()]
  for part in parts[1:]:
    title = part.splitlines()[0]
    if title in fresh:
      section = fresh.pop(title)
      markers = [ln for ln in part.splitlines() if ln.startswith("<!--") and ln not in section]
      part = "\n".join([section, *markers])
    out.append(part.strip())
  text = ""
  for part in out + list(fresh.values()):  # a marker line stays right above its section.
    text += part if not text else ("\n" if text.endswith("begin -->") else "\n\n") + part
  return text + "\n"


def main():
  sections = [section_of(run(script, ["--markdown", *args]))
              for script, args in MARKDOWN_BENCHMARKS]
  with tempfile.TemporaryDirectory() as d:
    results = pathlib.Path(d) / "RESULTS.md"
    run("train_throughput.py", [f"--results={results}"])
    sections.append(section_of(results.read_text()))
  header = (f"# Benchmarks\n\nThe benchmarks/ sections rewritten by `make bench` "
            f"(benchmarks/run_all.py) on {datetime.date.today()}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores; the others by the runs they name. Every ratio is "
            "measured side by side in one run; absolute times on these shared machines are "
            "noisy.\n")
  path = HERE / "RESULTS.md"
  path.write_text(merge(path.read_text() if path.exists() else "", header, sections))
  print("wrote", HERE / "RESULTS.md")


if __name__ == "__main__":
  main()
