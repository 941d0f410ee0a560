"""What a domain is: tools over a generated state, and kinds of tasks with the expert's script.

A kind makes one task from a random generator, a fresh state and the tools declared to the
agent: a `Spec` with the user's request, the expert's script and the goal. The script is a list of
steps (one assistant turn each, one or more calls); an argument may be an `R`, a value read from
an earlier step's result, which is how calls chain. The goal is checked, never the path: the
final state must equal `goal` (made with `world.simulate` from the intended call) and the final
answer must mention every string of `expect` (read from the state or the simulated result).
"""

from __future__ import annotations

import dataclasses
import difflib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from k2jax.agentic.world import CLOSE_MATCH_CUTOFF, Tool

TYPO_RATE = 0.3  # share of tasks of a kind with a name to misspell whose request misspells it.


class R(NamedTuple):
  """A value of an earlier step's result: `results[step][call]` indexed by each key of `path`
  (a negative `step` counts back from the last step done)."""

  step: int
  call: int
  path: tuple = ()


class Call(NamedTuple):
  """One tool call; argument values may be `R`s."""

  name: str
  arguments: Mapping[str, Any]


class Answer(NamedTuple):
  """The final answer: `text.format(**fields)`, each field a literal or an `R` (a list reads as
  its items joined with ', ')."""

  text: str
  fields: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Spec:
  """One task of a kind: request, script, and goal (`goal` None: the state must not change)."""

  user: str
  steps: tuple[tuple[Call, ...], ...]
  answer: Answer
  expect: tuple[str, ...]
  goal: dict | None = None
  typo: bool = False  # the request misspells a name: the first call fails and is retried.


class Kind(NamedTuple):
  """A kind of task: the tools its script calls, and `make(rng, state, declared_names) -> Spec`."""

  needs: tuple[str, ...]
  make: Callable[[random.Random, dict, Sequence[str]], Spec]


@dataclasses.dataclass(frozen=True)
class Domain:
  """Tools, `make_state(rng) -> state`, kinds, and system prompts (templates with `{agent}`)."""

  name: str
  tools: Mapping[str, Tool]
  make_state: Callable[[random.Random], dict]
  kinds: Mapping[str, Kind]
  systems: tuple[str, ...]


def domain(name, tools, make_state, kinds, systems) -> Domain:
  """A Domain with tools keyed by name and the domain-independent kind `no_tool` added."""
  return Domain(name, {t.name: t for t in tools}, make_state, {**kinds, "no_tool": NO_TOOL},
                tuple(systems))


def misspell(rng: random.Random, name: str, names: Sequence[str]) -> str:
  """`name`, or with probability TYPO_RATE a one-letter misspelling a did_you_mean maps back."""
  if rng.random() >= TYPO_RATE:
    return name
  for _ in range(20):
    i = rng.randrange(1, len(name))
    if not name[i].isalpha():
      continue
    typo = rng.choice((name[:i] + name[i + 1:], name[:i] + name[i] + name[i:],
                       name[:i - 1] + name[i] + name[i - 1] + name[i + 1:]))
    close = difflib.get_close_matches(typo, list(names), n=1, cutoff=CLOSE_MATCH_CUTOFF)
    if typo not in names and close == [name]:
      return typo
  return name


def listing(items: Sequence[str]) -> str:
  """'a', 'a and b', 'a, b and c'."""
  return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _no_tool(rng: random.Random, state: dict, tools: Sequence[str]) -> Spec:
  if rng.random() < 0.5:
    user = rng.choice(("Which tools can you use?", "What tools do you have?"))
    return Spec(user, (), Answer("I can use {tools}.", {"tools": listing(tools)}), tuple(tools))
  user = rng.choice(("Thanks, that's all.", "Thank you, bye!", "Great, thanks!"))
  return Spec(user, (), Answer("You're welcome. Goodbye!", {}), ("welcome",))


NO_TOOL = Kind((), _no_tool)
