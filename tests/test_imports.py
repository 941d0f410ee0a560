"""The import graph of k2jax: no cycle, and every import goes down the layers the README shows.

Read from the source with `ast` (imports inside functions included), so nothing is imported.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1] / "k2jax"
# Lower layers are more basic; a module imports only from lower layers or its own package.
LAYERS = (
    ("k2jax.config", "k2jax.paths", "k2jax.sharding", "k2jax.perf", "k2jax.distributed",
     "k2jax.hlo"),
    ("k2jax.presets", "k2jax.flops"),
    ("k2jax.model", "k2jax.optim", "k2jax.data"),
    ("k2jax.hf", "k2jax.decode", "k2jax.chat", "k2jax.plan", "k2jax.aot"),
    ("k2jax.train",),
    ("k2jax.agentic", "k2jax.scaling"),
    ("k2jax.rl",),  # RL plays the agent loop's tool worlds.
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _edges(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """module -> the k2jax modules it imports (`from pkg import sub` counts as pkg.sub)."""
  edges = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.startswith("k2jax")}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                          + ([node.module] if node.module else []))
        if not base.startswith("k2jax"):
          continue
        for a in node.names:
          found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    edges[name] = {m for m in found if m in modules and m != name}
  return edges


def _layer(name: str) -> tuple[int, str]:
  for i, layer in enumerate(LAYERS):
    for prefix in layer:
      if name == prefix or name.startswith(prefix + "."):
        return i, prefix
  raise AssertionError(f"{name} is in no layer of LAYERS (add it, and to the README)")


def test_no_import_cycle():
  edges = _edges(_modules())
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for n in sorted(edges[m]):
      assert state.get(n) != 1, "import cycle: " + " -> ".join(stack + [m, n])
      if n not in state:
        visit(n, stack + [m])
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m, [])


def test_imports_go_down_the_layers():
  edges = _edges(_modules())
  bad = []
  for m, targets in edges.items():
    if m == "k2jax":  # the package's public face re-exports from every layer.
      continue
    (lm, pm) = _layer(m)
    for n in targets:
      ln, pn = _layer(n)
      if ln > lm or (ln == lm and pn != pm):
        bad.append(f"{m} -> {n}")
  assert not bad, bad
