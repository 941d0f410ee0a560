"""k2jax.agentic: worlds, tools, tasks, the scripted expert, the rubric, splits, JSONL."""

import collections
import copy
import dataclasses
import json
import random

import pytest

from k2jax import agentic
from k2jax.agentic import expert, rubric, schema, tasks
from k2jax.agentic.domain import Call

SEED = 3


@pytest.fixture(scope="module")
def train():
  return agentic.make_tasks("train", 420, SEED)


@pytest.fixture(scope="module")
def heldout():
  return agentic.make_tasks("heldout", 300, SEED)


@pytest.fixture(scope="module")
def heldout_domain():
  return agentic.make_tasks("heldout_domain", 100, SEED)


def _turns(messages):
  """The assistant tool-call turns of a transcript, as lists of Calls."""
  return [[Call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
          for m in messages if m.get("tool_calls")]


def _strings(value):
  if isinstance(value, dict):
    for k, v in value.items():
      yield k
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)
  elif isinstance(value, str):
    yield value


def test_domains_and_tools_are_well_formed():
  assert len(agentic.DOMAINS) >= 6 and agentic.HELDOUT_DOMAIN in agentic.DOMAINS
  for domain in agentic.DOMAINS.values():
    assert 3 <= len(domain.tools) <= 6, domain.name
    for name, tool in domain.tools.items():
      fn = tool.declaration["function"]
      params = fn["parameters"]
      assert tool.declaration["type"] == "function" and fn["name"] == name
      assert "\n" not in fn["description"] and len(fn["description"]) <= 60
      assert params["type"] == "object" and set(params["required"]) <= set(params["properties"])
    kinds_with_tools = [k for k in domain.kinds.values() if k.needs]
    assert len(domain.kinds) >= 4 and "no_tool" in domain.kinds
    # Every tool is needed by some kind; every kind can be split into train/held-out subsets.
    assert {n for k in kinds_with_tools for n in k.needs} == set(domain.tools), domain.name
    for kind in domain.kinds.values():
      train, held = agentic.tool_combinations(domain, kind.needs)
      assert train and held and not set(train) & set(held)
      assert all(set(kind.needs) <= set(c) and 2 <= len(c) <= 4 for c in train + held)


def test_determinism_under_a_seed(train):
  again = agentic.make_tasks("train", 420, SEED)
  assert again == train
  assert agentic.make_tasks("train", 30, SEED) == train[:30]  # task i does not depend on n.
  assert [agentic.expert_messages(t) for t in again[:60]] == [
    agentic.expert_messages(t) for t in train[:60]]
  other = agentic.make_tasks("train", 60, SEED + 1)
  assert sum(a.state == b.state for a, b in zip(other, train)) == 0


def test_every_expert_trajectory_passes_its_rubric(train, heldout, heldout_domain):
  kinds, tags, n_calls = set(), collections.Counter(), collections.Counter()
  for task in train + heldout + heldout_domain:
    messages = agentic.expert_messages(task)
    assert agentic.judge(task, messages) == (True, "goal reached"), task.id
    # Replayed in a fresh world, the calls give exactly the recorded results (judge checks it;
    # here independently) and end in the goal state.
    world = task.new_world()
    results = [world.call(c.name, c.arguments) for turn in _turns(messages) for c in turn]
    assert results == [m["content"] for m in messages if m["role"] == "tool"]
    assert world.state == task.goal
    kinds.add((task.domain, task.kind))
    tags.update(task.tags or ("single",))
    n_calls[len(results)] += 1
  assert kinds == {(d.name, k) for d in agentic.DOMAINS.values() for k in d.kinds}
  assert set(tags) == {"single", "no_tool", "chain", "parallel", "recovery"}
  assert set(n_calls) == {0, 1, 2, 3, 4}


def test_a_wrong_tool_argument_fails_the_rubric(train):
  """The last call of each transcript with one argument changed to another value its tool
  accepts (a name from the world, an enum value, a number + 1) and a different outcome."""
  tried = 0
  for task in train[:200]:
    if not task.steps:
      continue
    messages = agentic.expert_messages(task)
    turns = _turns(messages)
    right = task.new_world()
    for turn in turns:
      for call in turn:
        right.call(call.name, call.arguments)
    right_result = [m["content"] for m in messages if m["role"] == "tool"][-1]
    last = turns[-1][-1]
    properties = {d["function"]["name"]: d["function"]["parameters"]["properties"]
                  for d in task.tools}[last.name]
    wrongs = []
    for key, value in last.arguments.items():
      if isinstance(value, str):
        candidates = [*properties[key].get("enum", ()), *sorted(set(_strings(task.state)))]
      else:
        candidates = [value + 1]
      wrongs += [(key, c) for c in candidates if c != value]
    n_wrong = 0
    for key, value in wrongs:
      world, history = task.new_world(), []
      for turn in turns:
        calls = turn if turn is not turns[-1] else [
          *turn[:-1], Call(last.name, {**last.arguments, key: value})]
        history.append([(c, world.call(c.name, c.arguments)) for c in calls])
      result = history[-1][-1][1]
      if "error" in json.loads(result) or (result == right_result and world.state == right.state):
        continue  # not accepted, or no different outcome.
      answer = expert.next_action(task, history)
      assert isinstance(answer, str)
      ok, reason = task.check(world, answer)
      assert not ok, (task.id, key, value, answer)
      n_wrong += 1
    assert n_wrong, task.id
    tried += n_wrong
  assert tried > 1000


def test_the_rubric_checks_state_and_answer(train):
  for task in train[:100]:
    messages = agentic.expert_messages(task)
    answer = messages[-1]["content"]
    world = task.new_world()
    for turn in _turns(messages):
      for call in turn:
        world.call(call.name, call.arguments)
    assert task.check(world, answer)[0]
    assert task.check(world, None) == (False, "no final answer")
    # Each value the answer must mention, replaced, fails it.
    for value in task.expect:
      assert not task.check(world, answer.replace(value, "?"))[0]
    if task.goal != task.state:  # a state task: the right answer without the calls fails.
      ok, reason = task.check(task.new_world(), answer)
      assert not ok and reason.startswith("final state differs in")
  assert rubric.mentions("It costs 12.", "12") and rubric.mentions("p12", "p12")
  assert not any(rubric.mentions(s, "12") for s in ("112", "12.5", "F12", "1.12"))
  assert rubric.mentions("is 12.5 kg", "12.5") == len("is 12.5")


def test_recovery_retries_with_the_named_fix_and_gives_up_on_others(train):
  recovering = [t for t in train if "recovery" in t.tags]
  assert len(recovering) >= 30
  for task in recovering:
    messages = agentic.expert_messages(task)
    results = [json.loads(m["content"]) for m in messages if m["role"] == "tool"]
    errors = [r for r in results if isinstance(r, dict) and "error" in r]
    assert len(errors) == 1 and "did_you_mean" in errors[0]
    (key, fix), = errors[0]["did_you_mean"].items()
    turns = _turns(messages)
    assert turns[1][0].arguments[key] == fix != turns[0][0].arguments[key]
    assert turns[0][0].arguments[key] in task.user  # copied from the misspelt request.
  # An error without a fix (no stock) ends with an apology, which fails the rubric.
  task = next(t for t in train if t.domain == "shop" and t.kind == "buy" and not t.tags)
  (call,) = task.steps[0]
  name = call.arguments["name"]
  too_many = Call("buy", {"name": name, "quantity": task.state["products"][name]["stock"] + 1})
  world = task.new_world()
  history = [[(too_many, world.call("buy", too_many.arguments))]]
  answer = expert.next_action(task, history)
  assert answer.startswith(expert.SORRY) and "in stock" in answer
  assert not task.check(world, answer)[0]


def test_messages_follow_the_openai_schema_with_k2_ids(train):
  for task in train[:150]:
    messages = agentic.expert_messages(task)
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    assert messages[0]["content"] == task.system and messages[1]["content"] == task.user
    assert messages[-1].keys() == {"role", "content"} and messages[-1]["role"] == "assistant"
    index, pending = 0, []
    for m in messages[2:-1]:
      if m["role"] == "assistant":
        assert not pending and m["content"] == "" and m["tool_calls"]
        for call in m["tool_calls"]:
          assert call.keys() == {"id", "type", "function"} and call["type"] == "function"
          assert isinstance(call["function"]["arguments"], dict)
          assert call["id"] == f"functions.{call['function']['name']}:{index}"
          index += 1
          pending.append(call)
      else:
        call = pending.pop(0)
        assert m == {"role": "tool", "tool_call_id": call["id"],
                     "name": call["function"]["name"], "content": m["content"]}
    assert not pending
    declared = {d["function"]["name"] for d in task.tools}
    assert 2 <= len(declared) <= 4 and declared <= set(agentic.DOMAINS[task.domain].tools)


def test_splits(train, heldout, heldout_domain):
  assert {t.domain for t in heldout_domain} == {agentic.HELDOUT_DOMAIN}
  seen = set(agentic.DOMAINS) - {agentic.HELDOUT_DOMAIN}
  assert {t.domain for t in train} == seen == {t.domain for t in heldout}

  def combo(t):
    needs = agentic.DOMAINS[t.domain].kinds[t.kind].needs
    return t.domain, tuple(sorted(needs)), tuple(sorted(d["function"]["name"] for d in t.tools))

  assert not {combo(t) for t in train} & {combo(t) for t in heldout}
  for t in train + heldout:
    train_side, held_side = agentic.tool_combinations(agentic.DOMAINS[t.domain],
                                                      agentic.DOMAINS[t.domain].kinds[t.kind].needs)
    assert combo(t)[2] in (train_side if t.split == "train" else held_side)
  # Other world instances: no held-out world, request or task id is one of train's.
  states = {json.dumps(t.state, sort_keys=True) for t in train}
  assert not any(json.dumps(t.state, sort_keys=True) in states for t in heldout + heldout_domain)
  assert not {t.id for t in train} & {t.id for t in heldout + heldout_domain}
  with pytest.raises(ValueError, match="split must be one of"):
    agentic.make_tasks("test", 1)


def test_jsonl_round_trip_and_the_rubric_filter(tmp_path, train):
  path = str(tmp_path / "data" / "train.jsonl")
  assert agentic.write_jsonl(path, train[:40]) == {"written": 40, "dropped": 0}
  records = list(agentic.read_jsonl(path))
  assert [r["task_id"] for r in records] == [t.id for t in train[:40]]
  for record, task in zip(records, train[:40]):
    assert record["messages"] == agentic.expert_messages(task)
    assert record["tools"] == list(task.tools)
    assert (record["domain"], record["kind"], record["split"]) == (task.domain, task.kind, "train")
  # A task whose rubric the expert cannot meet is dropped and counted.
  broken = dataclasses.replace(train[0], expect=("no such value",))
  assert agentic.write_jsonl(path, [broken, train[1]]) == {"written": 1, "dropped": 1}
  assert [r["task_id"] for r in agentic.read_jsonl(path)] == [train[1].id]


@pytest.mark.parametrize("line, error", [
  ("{not json", "line 2: not valid JSON"),
  ('{"tools": []}', "line 2: no list field 'messages'"),
  ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: message 0 has no role"),
  ('{"messages": [{"role": "user"}]}', "line 2: message 0 \\(user\\) has no string content"),
  ('{"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}',
   "line 2: message 0: tool_call_id 'x' names no earlier call"),
  ('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}]}',
   "line 2: 'tools' is not a list"),
])
def test_read_jsonl_names_the_bad_line(tmp_path, line, error):
  good = {"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "2"}]}
  path = tmp_path / "x.jsonl"
  path.write_text(json.dumps(good) + "\n\n")
  assert list(agentic.read_jsonl(str(path))) == [good]  # external data: string arguments.
  path.write_text(json.dumps(good) + "\n" + line + "\n")
  with pytest.raises(ValueError, match=f"x.jsonl {error}"):
    list(agentic.read_jsonl(str(path)))


def test_validate_arguments():
  params = {"type": "object", "properties": {
    "name": {"type": "string"}, "n": {"type": "integer", "minimum": 1},
    "x": {"type": "number"}, "unit": {"type": "string", "enum": ["km", "mi"]},
    "tags": {"type": "array", "items": {"type": "string"}}, "flag": {"type": "boolean"},
  }, "required": ["name", "n"]}
  ok = {"name": "a", "n": 2, "x": 1, "unit": "km", "tags": ["a"], "flag": False}
  assert agentic.validate_arguments(params, ok) is None
  assert agentic.validate_arguments(params, {"name": "a", "n": 1, "x": 2.5}) is None
  bad = {
    "missing 'n'": {"name": "a"},
    "unexpected 'm'": {"name": "a", "n": 1, "m": 0},
    "'n' must be of type integer, got \"2\"": {"name": "a", "n": "2"},
    "'n' must be of type integer, got 2.0": {"name": "a", "n": 2.0},
    "'n' must be of type integer, got true": {"name": "a", "n": True},
    "'x' must be of type number, got false": {"name": "a", "n": 1, "x": False},
    "'n' must be at least 1, got 0": {"name": "a", "n": 0},
    "'unit' must be one of km, mi, got \"ft\"": {"name": "a", "n": 1, "unit": "ft"},
    "'tags[1]' must be of type string, got 3": {"name": "a", "n": 1, "tags": ["a", 3]},
    "'flag' must be of type boolean, got 1": {"name": "a", "n": 1, "flag": 1},
    "arguments must be of type object, got [1]": [1],
  }
  for problem, arguments in bad.items():
    assert agentic.validate_arguments(params, arguments) == problem
  declarations = [schema.declare("f", "F.", name={"type": "string"}, n={"type": "integer"})]
  assert agentic.check_call(declarations, "f", '{"name": "a", "n": 1}') is None
  assert agentic.check_call(declarations, "g", {}) == 'unknown tool "g"; tools: f'
  long = agentic.check_call(declarations, "f", {"name": "é" * 100, "n": 1.5})
  assert long == "bad arguments for f: 'n' must be of type integer, got 1.5"
  long = agentic.check_call(declarations, "f", {"name": ["é" * 100], "n": 1})
  assert long == f"bad arguments for f: 'name' must be of type string, got [\"{'é' * 35}..."
  assert agentic.check_call(declarations, "f", '{"name": ') == "arguments of f are not valid JSON"
  assert agentic.check_call(declarations, "f", {"name": "a"}) == "bad arguments for f: missing 'n'"


def test_world_call_never_raises():
  """Random names and arguments (wrong types, missing and extra keys, bad JSON) on every tool."""
  rng = random.Random(0)
  values = [None, True, 0, -3, 7, 2.5, 1e300, "", "x", "F101", "@ana", "2025-06-03", "09:30",
            "notes/todo.txt", "km", "EUR", "length", [], ["a"], {}, {"a": 1}]
  n_ok = n_domain_errors = 0
  for task in agentic.make_tasks("train", 60, 1) + agentic.make_tasks("heldout_domain", 10, 1):
    world = task.new_world()
    names = [*world.tools, "nope", None, ["x"]]
    for _ in range(40):
      name = rng.choice(names)
      known = isinstance(name, str) and name in world.tools
      keys = list(world.tools[name].declaration["function"]["parameters"]["properties"]
                  ) if known else ["a"]
      arguments = {k: rng.choice(values) for k in keys if rng.random() < 0.9}
      if rng.random() < 0.2:
        arguments["extra"] = 1
      if rng.random() < 0.2:
        arguments = json.dumps(arguments)[:rng.randint(0, 30)]
      before = copy.deepcopy(world.state)
      result = json.loads(world.call(name, arguments))
      problem = agentic.check_call(world.declarations, name, arguments)
      if problem is not None:
        assert result == {"error": problem}
      if isinstance(result, dict) and "error" in result:
        assert world.state == before  # a failed call changes nothing.
      n_ok += problem is None
      n_domain_errors += problem is None and isinstance(result, dict) and "error" in result
  assert n_ok > 200 and 100 < n_domain_errors < n_ok - 30  # valid calls: errors and successes.


def test_tools_compute_what_they_say():
  units = agentic.DOMAINS["units"].tools
  state = {"eur_rates": {"EUR": 1.0, "USD": 1.25, "GBP": 0.85, "JPY": 160.0, "CHF": 0.95}}
  world = agentic.World(state, list(units.values()))
  call = lambda tool, /, **kw: json.loads(world.call(tool, kw))
  assert call("convert", value=10, from_unit="mi", to_unit="km")["value"] == round(16.09344, 2)
  assert call("convert", value=100, from_unit="C", to_unit="F")["value"] == 212.0
  assert call("convert", value=3, from_unit="lb", to_unit="oz")["value"] == 48.0
  assert "cannot convert" in call("convert", value=1, from_unit="km", to_unit="kg")["error"]
  assert call("exchange", amount=50, from_currency="USD", to_currency="GBP")["amount"] == 34.0
  assert call("get_rate", from_currency="GBP", to_currency="JPY")["rate"] == round(160 / .85, 4)
  shop = agentic.DOMAINS["shop"].tools
  state = {"products": {"Pillow": {"price": 7, "stock": 2}}, "orders": {}}
  world = agentic.World(state, list(shop.values()))
  assert call("buy", name="Pillow", quantity=2) == {"order_id": "S101", "total": 14}
  assert call("buy", name="Pillow", quantity=1) == {"error": "only 0 Pillow in stock"}
  assert call("get_product", name="Pilow") == {
    "error": "unknown product 'Pilow'", "did_you_mean": {"name": "Pillow"}}
  assert state == {"products": {"Pillow": {"price": 7, "stock": 0}},
                   "orders": {"S101": {"product": "Pillow", "quantity": 2, "total": 14}}}


def test_tool_combinations_reject_a_kind_without_two_subsets():
  domain = agentic.DOMAINS["units"]
  with pytest.raises(ValueError, match="domain units: tasks needing .* need 2 to split them"):
    tasks.tool_combinations(domain, tuple(domain.tools))
