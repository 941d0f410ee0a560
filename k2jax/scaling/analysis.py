"""Analysis of a sweep directory: fits, multipliers, plots and a markdown report.

The sweep file's ANALYSIS dict (copied to DIR/sweep.json by the runner) says what to compare:
  kind: "compute" (fit loss vs compute per arm, multipliers at equal loss) or "curves" (a metric
    over training steps per arm, e.g. max logits)
  arm: the override key whose value names an arm ("optimizer.name", "label.tau", ...)
  reference: the arm the multipliers divide by (compute kind)
  x, y: the row fields of compute and loss (default "flops", "eval_loss")
  group: optional override key; adds a plot of y against the (numeric) arm, one line per group
  metric, hlines: the metrics.jsonl field of the curves kind and reference lines (e.g. tau)
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict

from k2jax.scaling import plots
from k2jax.scaling.fit import compute_multiplier, equal_loss_multiplier, fit_power_law
from k2jax.scaling.sweep import SWEEP_FILE, read_results


def _loss(row: dict, key: str) -> float:
  value = row.get(key)
  return float(row["loss_tail"] if value is None else value)


def _label(value) -> str:
  return str(value)


def _point(row: dict, arm: str) -> str:
  """A short description of a point: its overrides but the arm, labels standing in for the keys
  they name."""
  o = row["overrides"]
  labels = {k: v for k, v in o.items() if k.startswith("label.") and k != arm}
  shown = labels or {k: v for k, v in o.items() if k != arm}
  return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in shown.items()) or row["name"]


def points_table(rows: list[dict], arm: str, y: str) -> str:
  """Markdown table of every finished point."""
  lines = ["| arm | point | activated / total params | tokens | FLOPs | train loss (last 10%) "
           f"| {y} | peak max logit | wall s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {_label(r['overrides'].get(arm))} | {_point(r, arm)} "
        f"| {r['params_activated'] / 1e6:.3f}M"
        f" / {r['params_total'] / 1e6:.3f}M | {r['tokens']:,} | {r['flops']:.3g} "
        f"| {r['loss_tail']:.4f} | {'diverged' if r.get('diverged') else f'{_loss(r, y):.4f}'} "
        f"| {r['max_logit_peak']:.1f} "
        f"| {r['wall_s']:.0f} |")
  return "\n".join(lines)


def compute_report(rows: list[dict], spec: dict, directory: pathlib.Path,
                   tag: str = "") -> tuple[str, dict]:
  """Power-law fit per arm, multipliers against the reference arm, plots (names end with
  `tag`); (markdown, numbers)."""
  arm_key, x, y = spec["arm"], spec.get("x", "flops"), spec.get("y", "eval_loss")
  arms: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
  for r in rows:
    if r.get("diverged"):
      continue
    c, l = arms[_label(r["overrides"].get(arm_key))]
    c.append(float(r[x]))
    l.append(_loss(r, y))
  fits = {}
  for arm, (c, l) in arms.items():
    if len(set(c)) >= 2:
      fits[arm] = fit_power_law(c, l)
  ref = _label(spec.get("reference", next(iter(arms))))
  out = {"fits": {a: {"a": f.a, "b": f.b, "r2": f.r2} for a, f in fits.items()},
         "multipliers": {}}
  lines = [f"Fits of {y} = a * C^-b against C = {x}; multiplier = C(arm) / C({ref}) at equal "
           "loss (< 1: the arm needs less compute).", "",
           "| arm | points | fit | r^2 | multiplier (interpolated) | multiplier (fits) "
           "| at loss |", "|---|---|---|---|---|---|---|"]
  for arm, (c, l) in arms.items():
    fit = fits.get(arm)
    mult_i, at = (None, None)
    mult_f = None
    if arm != ref and ref in arms:
      mult_i, at = equal_loss_multiplier(c, l, *arms[ref])
      if fit is not None and ref in fits:
        at_f = at if at is not None else min(arms[ref][1])
        mult_f = compute_multiplier(fit, fits[ref], at_f)
        at = at_f
    out["multipliers"][arm] = {"interpolated": mult_i, "fit": mult_f, "loss": at}
    lines.append(
        f"| {arm} | {len(c)} | {fit if fit else '-'} | {f'{fit.r2:.3f}' if fit else '-'} "
        f"| {f'{mult_i:.3f}' if mult_i is not None else '-'} "
        f"| {f'{mult_f:.3f}' if mult_f is not None else '-'} "
        f"| {f'{at:.4f}' if at is not None else '-'} |")
  figures = [plots.loss_vs_compute(dict(arms), fits, directory / f"loss_vs_compute{tag}.png", y,
                                   f"{y} vs compute by {arm_key}")]
  if spec.get("group"):
    group_md, out["by_group"], figure = _group_report(rows, spec, ref, directory, tag)
    lines += ["", group_md]
    figures += [figure] if figure else []
  return "\n".join(lines) + "\n\n" + _images(figures, directory), out


def _group_report(rows, spec, ref, directory, tag):
  """Per group (e.g. budget): each arm's loss relative to the reference arm's; a plot of loss vs
  the arm value when the arm values are numbers."""
  arm_key, group_key, y = spec["arm"], spec["group"], spec.get("y", "eval_loss")
  by_group: dict[str, dict[str, float]] = defaultdict(dict)
  for r in rows:
    if r.get("diverged"):
      continue
    by_group[_label(r["overrides"].get(group_key))][_label(r["overrides"].get(arm_key))] = (
        _loss(r, y))
  name = group_key.split(".")[-1]
  lines = [f"| {name} | {arm_key} | {y} | change vs {ref} |", "|---|---|---|---|"]
  out = {}
  for group, losses in by_group.items():
    for arm, loss in losses.items():
      change = loss / losses[ref] - 1 if ref in losses else None
      out.setdefault(group, {})[arm] = {"loss": loss, "change": change}
      lines.append(f"| {group} | {arm} | {loss:.4f} | "
                   f"{f'{change:+.2%}' if change is not None else '-'} |")
  figure = None
  try:
    series = {f"{name}={g}": ([float(a) for a in ls], list(ls.values()))
              for g, ls in by_group.items()}
  except ValueError:
    series = None
  if series:
    figure = plots.loss_vs_value(series, directory / f"loss_vs_arm{tag}.png",
                                 spec.get("arm_name", arm_key), y)
  return "\n".join(lines), out, figure


def curves_report(rows: list[dict], spec: dict, directory: pathlib.Path) -> tuple[str, dict]:
  """A metric (and the train loss) over steps per arm; final numbers per arm."""
  from k2jax.train.metrics import read_metrics

  metric, arm_key = spec.get("metric", "max_logit"), spec["arm"]
  metric_series, loss_series, out = {}, {}, {}
  for r in rows:
    records = [m for m in read_metrics(directory / "points" / r["name"]) if "loss" in m]
    arm = _label(r["overrides"].get(arm_key))
    steps = [m["step"] for m in records]
    metric_series[arm] = (steps, [m[metric] for m in records])
    loss_series[arm] = (steps, [m["loss"] for m in records])
    out[arm] = {f"peak_{metric}": max(metric_series[arm][1]),
                f"final_{metric}": metric_series[arm][1][-1],
                "loss_tail": r["loss_tail"], "eval_loss": r.get("eval_loss")}
  figures = [
      plots.curves(metric_series, directory / f"{metric}.png", metric, f"{metric} by {arm_key}",
                   logy=True, hlines=spec.get("hlines", ())),
      plots.curves(loss_series, directory / "train_loss.png", "train loss", "train loss")]
  lines = [f"| {arm_key} | peak {metric} | final {metric} | train loss (last 10%) | eval loss |",
           "|---|---|---|---|---|"]
  for arm, v in out.items():
    ev = f"{v['eval_loss']:.4f}" if v["eval_loss"] is not None else "-"
    lines.append(f"| {arm} | {v[f'peak_{metric}']:.1f} | {v[f'final_{metric}']:.1f} "
                 f"| {v['loss_tail']:.4f} | {ev} |")
  return "\n".join(lines) + "\n\n" + _images(figures, directory), out


def _images(paths, directory: pathlib.Path) -> str:
  return "\n".join(f"![{p.stem}]({p.relative_to(directory)})" for p in paths)


def analyze(directory: str | pathlib.Path, y: str | None = None) -> tuple[str, dict]:
  """Writes DIR/analysis.md, DIR/analysis.json and the PNGs; returns (markdown, numbers).

  `y` (e.g. "loss_tail", the train loss over the last 10% of steps: batches not yet trained on)
  replaces the sweep's loss field; its files are then named analysis_<y>.md, ..._<y>.png.
  """
  directory = pathlib.Path(directory)
  meta_path = directory / SWEEP_FILE
  if not meta_path.exists():
    raise ValueError(f"{directory} is not a sweep directory (no {SWEEP_FILE})")
  meta = json.loads(meta_path.read_text())
  spec = meta["analysis"] if y is None else {**meta["analysis"], "y": y}
  tag = "" if y is None else f"_{y}"
  if spec.get("kind") not in ("compute", "curves") or "arm" not in spec:
    raise ValueError(f"{meta_path}: analysis needs kind 'compute' or 'curves' and an arm, "
                     f"got {spec}")
  if tag and spec["kind"] == "curves":
    raise ValueError(f"y={y!r}: only a 'compute' analysis fits another loss field; {meta_path} "
                     "is 'curves' (its table already lists the train and eval losses)")
  rows = read_results(directory)
  if not rows:
    raise ValueError(f"{directory}: no finished points in results.jsonl")
  order = {p["name"]: i for i, p in enumerate(meta["points"])}
  rows.sort(key=lambda r: order.get(r["name"], len(order)))
  y = spec.get("y", "eval_loss")
  if spec["kind"] == "compute":
    body, numbers = compute_report(rows, spec, directory, tag)
  else:
    body, numbers = curves_report(rows, spec, directory)
  md = (f"## {meta['title']}\n\n{len(rows)} of {len(meta['points'])} points finished.\n\n"
        f"{points_table(rows, spec['arm'], y)}\n\n{body}\n")
  (directory / f"analysis{tag}.md").write_text(md)
  (directory / f"analysis{tag}.json").write_text(json.dumps(numbers, indent=2, default=float))
  return md, numbers



