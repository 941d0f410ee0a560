"""A file system: text files under a few directories; read, write, move, delete."""

from __future__ import annotations

from k2jax.agentic.domain import Answer, Call, Kind, R, Spec, domain, misspell
from k2jax.agentic.schema import declare
from k2jax.agentic.world import Tool, ToolError, lookup, simulate

_DIRS = {
  "notes": ("todo.txt", "ideas.txt", "shopping.txt", "recipes.txt", "books.txt"),
  "work": ("report.txt", "plan.txt", "budget.txt", "minutes.txt", "contacts.txt"),
  "travel": ("tickets.txt", "hotel.txt", "packing.txt", "visa.txt", "route.txt"),
  "home": ("bills.txt", "garden.txt", "repairs.txt", "wifi.txt", "pets.txt"),
}
_TEXTS = ("buy milk and eggs", "call the plumber", "meeting moved to Friday", "pack the charger",
          "room 214, second floor", "water the tomatoes", "pay rent on the 1st",
          "draft is due Monday", "gate B12 at 7:40", "password is on the router",
          "try the lentil soup", "send slides to Ana")


def _make_state(rng):
  dirs = rng.sample(sorted(_DIRS), 3)
  texts = iter(rng.sample(_TEXTS, 6))
  files = {}
  for d, count in zip(dirs, (1, 2, 3)):  # one directory holds a single file.
    for name in rng.sample(_DIRS[d], count):
      files[f"{d}/{name}"] = next(texts)
  return {"files": dict(sorted(files.items()))}


def _dirs(state):
  return sorted({path.split("/")[0] for path in state["files"]})


def _list_dir(state, path):
  lookup(dict.fromkeys(_dirs(state)), path, "path", "directory")
  return [p for p in state["files"] if p.split("/")[0] == path]


def _read_file(state, path):
  return {"content": lookup(state["files"], path, "path", "file")}


def _check_path(path):
  if path.count("/") != 1 or not path.endswith(".txt"):
    raise ToolError(f"a path looks like dir/name.txt, got {path!r}")


def _write_file(state, path, content):
  _check_path(path)
  state["files"] = dict(sorted({**state["files"], path: content}.items()))
  return {"saved": path, "size": len(content)}


def _move_file(state, path, new_path):
  content = lookup(state["files"], path, "path", "file")
  _check_path(new_path)
  if new_path in state["files"]:
    raise ToolError(f"{new_path} already exists")
  del state["files"][path]
  state["files"] = dict(sorted({**state["files"], new_path: content}.items()))
  return {"moved": path, "to": new_path}


def _delete_file(state, path):
  lookup(state["files"], path, "path", "file")
  del state["files"][path]
  return {"deleted": path}


_S = {"type": "string"}
TOOLS = (
  Tool(declare("list_dir", "Files in a directory.", path=_S), _list_dir),
  Tool(declare("read_file", "Read a text file.", path=_S), _read_file),
  Tool(declare("write_file", "Write a text file (replaces it).", path=_S, content=_S),
       _write_file),
  Tool(declare("move_file", "Move or rename a file.", path=_S, new_path=_S), _move_file),
  Tool(declare("delete_file", "Delete a file.", path=_S), _delete_file),
)
_T = {t.name: t for t in TOOLS}


def _existing(rng, state):
  path = rng.choice(list(state["files"]))
  return path, misspell(rng, path, list(state["files"]))


def _fresh(rng, state):
  d = rng.choice(_dirs(state))
  return f"{d}/{rng.choice([n for n in _DIRS[d] if f'{d}/{n}' not in state['files']])}"


def _read(rng, state, tools):
  path, shown = _existing(rng, state)
  request = rng.choice(("What's in {p}?", "Read {p} for me."))
  answer = Answer("{p} says: {content}", {"p": path, "content": R(0, 0, ("content",))})
  steps = ((Call("read_file", {"path": shown}),),)
  return Spec(request.format(p=shown), steps, answer, (state["files"][path],), typo=shown != path)


def _write(rng, state, tools):
  path = _fresh(rng, state)
  text = rng.choice(_TEXTS)
  request = rng.choice(("Save '{t}' to {p}.", "Write '{t}' into {p}."))
  answer = Answer("Saved {p}.", {"p": R(0, 0, ("saved",))})
  goal, _ = simulate(state, _T["write_file"], path=path, content=text)
  steps = ((Call("write_file", {"path": path, "content": text}),),)
  return Spec(request.format(t=text, p=path), steps, answer, (path,), goal)


def _copy(rng, state, tools):
  path, shown = _existing(rng, state)
  new_path = _fresh(rng, state)
  request = rng.choice(("Copy {p} to {q}.", "Make a copy of {p} at {q}."))
  answer = Answer("Copied {p} to {q}.", {"p": path, "q": R(1, 0, ("saved",))})
  goal, _ = simulate(state, _T["write_file"], path=new_path, content=state["files"][path])
  steps = ((Call("read_file", {"path": shown}),),
           (Call("write_file", {"path": new_path, "content": R(0, 0, ("content",))}),))
  return Spec(request.format(p=shown, q=new_path), steps, answer, (new_path,), goal,
              shown != path)


def _rename(rng, state, tools):
  path, shown = _existing(rng, state)
  new_path = _fresh(rng, state)
  request = rng.choice(("Rename {p} to {q}.", "Move {p} to {q}."))
  answer = Answer("Moved {p} to {q}.", {"p": path, "q": R(0, 0, ("to",))})
  goal, _ = simulate(state, _T["move_file"], path=path, new_path=new_path)
  steps = ((Call("move_file", {"path": shown, "new_path": new_path}),),)
  return Spec(request.format(p=shown, q=new_path), steps, answer, (new_path,), goal,
              shown != path)


def _only_file(rng, state, tools):
  (d,) = [d for d in _dirs(state) if len(_list_dir(state, d)) == 1]
  (path,) = _list_dir(state, d)
  request = rng.choice(("Read the only file in {d}.", "What does the one file in {d} say?"))
  answer = Answer("{p} says: {content}", {"p": R(0, 0, (0,)), "content": R(1, 0, ("content",))})
  steps = ((Call("list_dir", {"path": d}),), (Call("read_file", {"path": R(0, 0, (0,))}),))
  return Spec(request.format(d=d), steps, answer, (path, state["files"][path]))


def _delete(rng, state, tools):
  path, shown = _existing(rng, state)
  request = rng.choice(("Delete {p}.", "Remove the file {p}."))
  answer = Answer("Deleted {p}.", {"p": R(0, 0, ("deleted",))})
  goal, _ = simulate(state, _T["delete_file"], path=path)
  steps = ((Call("delete_file", {"path": shown}),),)
  return Spec(request.format(p=shown), steps, answer, (path,), goal, shown != path)


DOMAIN = domain(
  "files", TOOLS, _make_state,
  {
    "read": Kind(("read_file",), _read),
    "write": Kind(("write_file",), _write),
    "copy": Kind(("read_file", "write_file"), _copy),
    "rename": Kind(("move_file",), _rename),
    "only_file": Kind(("list_dir", "read_file"), _only_file),
    "delete": Kind(("delete_file",), _delete),
  },
  ("You are {agent}, a file assistant. Use the tools and answer in one sentence.",
   "You are {agent}. You manage the user's files. Be brief."),
)
