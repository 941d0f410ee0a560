"""Scoring an agent from its episodes: success rate, valid tool-call rate, mean turns and failures
by kind, per domain; the tables, a transcript and a PNG of success by domain.

    stats = summarize(episodes)   # {"all": {...}, "by_domain": {domain: {...}}}

Each stats dict holds `episodes`, `success` (rate), `calls`, `valid_call_rate` (valid calls /
calls: None without a call), `mean_turns`, `outcomes` {outcome: count} and `call_errors`
{kind: count} (see k2jax.agentic.agent).
"""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from k2jax.agentic.agent import Episode  # noqa: E402


def summarize(episodes: Sequence[Episode]) -> dict:
  """{"all": stats, "by_domain": {domain: stats}} of `episodes` (see the module docstring)."""
  by_domain = collections.defaultdict(list)
  for e in episodes:
    by_domain[e.task.domain].append(e)
  return {"all": _stats(episodes),
          "by_domain": {d: _stats(es) for d, es in sorted(by_domain.items())}}


def _stats(episodes: Sequence[Episode]) -> dict:
  n = len(episodes)
  calls = sum(e.calls for e in episodes)
  return {
    "episodes": n,
    "success": sum(e.outcome == "success" for e in episodes) / n if n else 0.0,
    "calls": calls,
    "valid_call_rate": sum(e.valid_calls for e in episodes) / calls if calls else None,
    "mean_turns": sum(e.turns for e in episodes) / n if n else 0.0,
    "outcomes": dict(collections.Counter(e.outcome for e in episodes).most_common()),
    "call_errors": dict(collections.Counter(k for e in episodes for k, _ in e.call_errors)),
  }


def _rate(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def domain_table(summaries: Mapping[str, dict]) -> str:
  """Per split and domain: tasks, success, valid-call rate (calls), mean turns, failures by kind
  and bad calls by kind. `summaries` maps a split name to `summarize`'s result."""
  lines = [f"{'split':<15} {'domain':<9} {'tasks':>5} {'success':>8} {'valid calls':>15} "
           f"{'turns':>5}  failures; bad calls"]
  for split, summary in summaries.items():
    rows = list(summary["by_domain"].items())
    if len(rows) > 1:
      rows.append(("all", summary["all"]))
    for domain, s in rows:
      failures = ", ".join(f"{k} {v}" for k, v in s["outcomes"].items() if k != "success")
      bad = ", ".join(f"{k} {v}" for k, v in s["call_errors"].items())
      valid = f"{_rate(s['valid_call_rate'])} ({s['calls']})"
      lines.append(f"{split:<15} {domain:<9} {s['episodes']:>5} {_rate(s['success']):>8} "
                   f"{valid:>15} {s['mean_turns']:>5.2f}  {failures or '-'}; {bad or '-'}")
  return "\n".join(lines)


def comparison_table(results: Mapping[str, Mapping[str, dict]]) -> str:
  """One row per model: success, valid-call rate and mean turns on each split. `results` maps a
  model's name to {split: `summarize`'s result}."""
  splits = list(next(iter(results.values())))
  head = "".join(f" | {split + ': success, valid calls, turns':<44}" for split in splits)
  lines = [f"{'model':<32}{head}"]
  for name, summaries in results.items():
    cells = "".join(
      f" | {_rate(s['success']):>7}  {_rate(s['valid_call_rate']):>6} ({s['calls']:>4})  "
      f"{s['mean_turns']:>5.2f}{'':<15}" for s in (summaries[split]["all"] for split in splits))
    lines.append(f"{name[-32:]:<32}{cells}")
  return "\n".join(lines)


def transcript(episode: Episode) -> str:
  """The episode as readable lines: the request, each call and result, the answer, the verdict."""
  lines = [f"[{episode.task.id}] {episode.task.domain}/{episode.task.kind}: {episode.task.user}"]
  for m in episode.messages[2:]:
    if m["role"] == "tool":
      lines.append(f"  tool {m['name']}: {m['content']}")
      continue
    if m.get("content"):
      lines.append(f"  assistant: {m['content']}")
    for c in m.get("tool_calls") or ():
      arguments = c["function"]["arguments"]
      if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
      lines.append(f"  call {c['id']}: {arguments}")
  lines.append(f"  -> {episode.outcome} ({episode.reason})")
  return "\n".join(lines)


def plot_success(results: Mapping[str, Mapping[str, dict]], path: str | pathlib.Path
                 ) -> pathlib.Path:
  """A PNG of success rate by domain (every split's domains on one axis), a bar per model."""
  domains = [d for summaries in [next(iter(results.values()))] for s in summaries.values()
             for d in s["by_domain"]]
  fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2, 4))
  width = 0.8 / len(results)
  for i, (name, summaries) in enumerate(results.items()):
    rates = {d: st["success"] for s in summaries.values() for d, st in s["by_domain"].items()}
    xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(domains))]
    ax.bar(xs, [100 * rates.get(d, 0.0) for d in domains], width, label=name)
  ax.set_xticks(range(len(domains)), domains)
  ax.set(ylabel="success (%)", ylim=(0, 100), title="held-out success by domain")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
