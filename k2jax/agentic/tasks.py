"""Tasks: a world instance, an agent (system prompt, declared tools), a request and a goal.

`make_tasks(split, n, seed)` is deterministic in (split, n, seed); task i depends only on
(split, seed, i). Splits:
  train: the domains but HELDOUT_DOMAIN, with tool subsets of the train side of each kind.
  heldout: the same domains, other world instances (another random stream) and the held-out side
    of the tool subsets: no (domain, needed tools, declared tools) of it occurs in train.
  heldout_domain: HELDOUT_DOMAIN only, any tool subset.
An agent declares 2-4 of its domain's tools, all those the task needs, in a random order.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import random
from collections.abc import Sequence

from k2jax.agentic.domain import Answer, Call, Domain, R
from k2jax.agentic.domains import DOMAINS, HELDOUT_DOMAIN
from k2jax.agentic.rubric import mentions
from k2jax.agentic.world import World

SPLITS = ("train", "heldout", "heldout_domain")
MIN_TOOLS, MAX_TOOLS = 2, 4
HELDOUT_COMBO_SHARE = 3  # one in this many tool subsets of a kind is held out.
_AGENTS = ("Ava", "Max", "Nora", "Leo", "Iris", "Omar", "Zoe", "Finn")


@dataclasses.dataclass(frozen=True)
class Task:
  """One task. `tools` are the declarations the agent sees; `state` is never changed."""

  id: str
  split: str
  domain: str
  kind: str
  tags: tuple[str, ...]  # any of "no_tool", "chain", "parallel", "recovery".
  system: str
  tools: tuple[dict, ...]
  user: str
  state: dict
  steps: tuple[tuple[Call, ...], ...]  # the expert's script (see domain.py).
  answer: Answer
  expect: tuple[str, ...]
  goal: dict

  def new_world(self) -> World:
    """A fresh world: a copy of the initial state and the declared tools."""
    tools = DOMAINS[self.domain].tools
    return World(copy.deepcopy(self.state), [tools[d["function"]["name"]] for d in self.tools])

  def check(self, world: World, answer: str | None) -> tuple[bool, str]:
    """(success, reason): the world is in the goal state and `answer` mentions each of `expect`,
    in that order."""
    if world.state != self.goal:
      keys = [k for k in sorted(set(world.state) | set(self.goal))
              if world.state.get(k) != self.goal.get(k)]
      return False, f"final state differs in {', '.join(keys)}"
    if answer is None:
      return False, "no final answer"
    start = 0
    for value in self.expect:
      found = mentions(answer[start:], value)
      if found is None:
        return False, f"answer does not mention {value!r}" + (" after that" if start else "")
      start += found
    return True, "goal reached"


def tool_combinations(domain: Domain, needs: Sequence[str]) -> tuple[list, list]:
  """(train, held-out) tool subsets for a task needing `needs`: sorted tuples, both non-empty."""
  others = [name for name in domain.tools if name not in needs]
  combos = [tuple(sorted((*needs, *extra)))
            for k in range(len(others) + 1) for extra in itertools.combinations(others, k)
            if MIN_TOOLS <= len(needs) + k <= MAX_TOOLS]
  if len(combos) < 2:
    raise ValueError(f"domain {domain.name}: tasks needing {needs} have {len(combos)} tool "
                     f"subset(s) of {MIN_TOOLS}-{MAX_TOOLS} tools; need 2 to split them")
  key = lambda c: hashlib.sha256(f"{domain.name}|{sorted(needs)}|{c}".encode()).hexdigest()
  combos.sort(key=key)
  cut = max(1, len(combos) // HELDOUT_COMBO_SHARE)
  return sorted(combos[cut:]), sorted(combos[:cut])


def make_tasks(split: str, n: int, seed: int = 0) -> list[Task]:
  """`n` tasks of `split` (see the module docstring), round-robin over its domains."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  names = [HELDOUT_DOMAIN] if split == "heldout_domain" else sorted(set(DOMAINS) - {HELDOUT_DOMAIN})
  return [_make_task(split, seed, i, DOMAINS[names[i % len(names)]]) for i in range(n)]


def _make_task(split: str, seed: int, i: int, domain: Domain) -> Task:
  rng = random.Random(f"{split}/{seed}/{i}")
  kind = rng.choice(sorted(domain.kinds))
  train, heldout = tool_combinations(domain, domain.kinds[kind].needs)
  declared = list(rng.choice({"train": train, "heldout": heldout}.get(split, train + heldout)))
  rng.shuffle(declared)
  state = domain.make_state(rng)
  spec = domain.kinds[kind].make(rng, state, declared)
  calls = [call for step in spec.steps for call in step]
  called, needs = sorted({c.name for c in calls}), sorted(domain.kinds[kind].needs)
  if called != needs:
    raise ValueError(f"domain {domain.name}, kind {kind}: the script calls {called}, the kind "
                     f"needs {needs}")
  tags = [tag for tag, present in (
    ("no_tool", not calls),
    ("chain", any(isinstance(v, R) for c in calls for v in c.arguments.values())),
    ("parallel", any(len(step) > 1 for step in spec.steps)),
    ("recovery", spec.typo),
  ) if present]
  return Task(
    id=f"{split}/{seed}/{i}", split=split, domain=domain.name, kind=kind, tags=tuple(tags),
    system=rng.choice(domain.systems).format(agent=rng.choice(_AGENTS)),
    tools=tuple(domain.tools[name].declaration for name in declared), user=spec.user,
    state=state, steps=spec.steps, answer=spec.answer, expect=spec.expect,
    goal=state if spec.goal is None else spec.goal,
  )
