"""A calendar: events with a title, a date and a time; at most one event per slot."""

from __future__ import annotations

from k2jax.agentic.domain import Answer, Call, Kind, R, Spec, domain, misspell
from k2jax.agentic.schema import declare
from k2jax.agentic.world import Tool, ToolError, lookup, simulate

_TITLES = ("Dentist", "Team standup", "Yoga class", "Lunch with Sam", "Budget review",
           "Piano lesson", "Book club", "Car service", "Haircut", "Project demo", "Call with Mia",
           "Gym session", "Parent meeting", "Flight to Oslo")
_DATES = tuple(f"2025-06-{d:02d}" for d in range(2, 14))
_TIMES = ("08:00", "09:30", "11:00", "12:30", "14:00", "15:30", "17:00", "18:30")


def _make_state(rng):
  dates = sorted(rng.sample(_DATES, 3))
  slots = rng.sample([(d, t) for d in dates for t in _TIMES], 5)
  titles = rng.sample(_TITLES, 5)
  events = {f"e{i + 1}": {"title": title, "date": d, "time": t}
            for i, (title, (d, t)) in enumerate(zip(titles, slots))}
  return {"events": events}


def _check_slot(state, date, time, keep=None):
  if date not in _DATES:
    raise ToolError(f"date must be a day from {_DATES[0]} to {_DATES[-1]}")
  if time not in _TIMES:
    raise ToolError(f"time must be one of {', '.join(_TIMES)}")
  for event_id, e in state["events"].items():
    if (e["date"], e["time"]) == (date, time) and event_id != keep:
      raise ToolError(f"{date} {time} is taken by {e['title']}")


def _list_events(state, date):
  day = [{"id": i, "title": e["title"], "time": e["time"]}
         for i, e in state["events"].items() if e["date"] == date]
  return sorted(day, key=lambda e: e["time"])


def _find_event(state, title):
  by_title = {e["title"]: (i, e) for i, e in state["events"].items()}
  event_id, e = lookup(by_title, title, "title", "event")
  return {"id": event_id, "date": e["date"], "time": e["time"]}


def _create_event(state, title, date, time):
  _check_slot(state, date, time)
  event_id = f"e{max((int(i[1:]) for i in state['events']), default=0) + 1}"
  state["events"][event_id] = {"title": title, "date": date, "time": time}
  return {"event_id": event_id}


def _event(state, event_id):
  if event_id not in state["events"]:
    raise ToolError(f"unknown event {event_id!r}")
  return state["events"][event_id]


def _delete_event(state, event_id):
  _event(state, event_id)
  del state["events"][event_id]
  return {"deleted": event_id}


def _move_event(state, event_id, date, time):
  event = _event(state, event_id)
  _check_slot(state, date, time, keep=event_id)
  event.update(date=date, time=time)
  return {"event_id": event_id, "date": date, "time": time}


_S = {"type": "string"}
TOOLS = (
  Tool(declare("list_events", "Events on a date (YYYY-MM-DD), by time.", date=_S), _list_events),
  Tool(declare("find_event", "Find an event by title.", title=_S), _find_event),
  Tool(declare("create_event", "Add an event.", title=_S, date=_S, time=_S), _create_event),
  Tool(declare("delete_event", "Delete an event.", event_id=_S), _delete_event),
  Tool(declare("move_event", "Move an event to a new date and time.", event_id=_S, date=_S,
               time=_S), _move_event),
)
_T = {t.name: t for t in TOOLS}


def _titled(rng, state):
  events = state["events"]
  event_id = rng.choice(sorted(events))
  title = events[event_id]["title"]
  return event_id, title, misspell(rng, title, [e["title"] for e in events.values()])


def _free_slot(rng, state):
  taken = {(e["date"], e["time"]) for e in state["events"].values()}
  return rng.choice([(d, t) for d in _DATES for t in _TIMES if (d, t) not in taken])


def _when(rng, state, tools):
  event_id, title, shown = _titled(rng, state)
  request = rng.choice(("When is my {t}?", "What day and time is {t}?"))
  answer = Answer("{t} is on {date} at {time}.",
                  {"t": title, "date": R(0, 0, ("date",)), "time": R(0, 0, ("time",))})
  event = state["events"][event_id]
  steps = ((Call("find_event", {"title": shown}),),)
  return Spec(request.format(t=shown), steps, answer, (event["date"], event["time"]),
              typo=shown != title)


def _first_on(rng, state, tools):
  date = rng.choice(sorted({e["date"] for e in state["events"].values()}))
  request = rng.choice(("What is my first event on {d}?", "What comes first on {d}?"))
  answer = Answer("Your first event on {d} is {t} at {time}.",
                  {"d": date, "t": R(0, 0, (0, "title")), "time": R(0, 0, (0, "time"))})
  first = _list_events(state, date)[0]
  steps = ((Call("list_events", {"date": date}),),)
  return Spec(request.format(d=date), steps, answer, (first["title"], first["time"]))


def _add(rng, state, tools):
  taken = {e["title"] for e in state["events"].values()}
  title = rng.choice([t for t in _TITLES if t not in taken])
  date, time = _free_slot(rng, state)
  request = rng.choice(("Add {t} on {d} at {time}.", "Put {t} in my calendar, {d} {time}."))
  answer = Answer("Added {t} as {event}.", {"t": title, "event": R(0, 0, ("event_id",))})
  goal, out = simulate(state, _T["create_event"], title=title, date=date, time=time)
  steps = ((Call("create_event", {"title": title, "date": date, "time": time}),),)
  return Spec(request.format(t=title, d=date, time=time), steps, answer, (out["event_id"],), goal)


def _cancel(rng, state, tools):
  event_id, title, shown = _titled(rng, state)
  request = rng.choice(("Cancel my {t}.", "Delete {t} from my calendar."))
  answer = Answer("Cancelled {t} ({event}).", {"t": title, "event": R(-1, 0, ("deleted",))})
  goal, _ = simulate(state, _T["delete_event"], event_id=event_id)
  steps = ((Call("find_event", {"title": shown}),),
           (Call("delete_event", {"event_id": R(0, 0, ("id",))}),))
  return Spec(request.format(t=shown), steps, answer, (event_id,), goal, shown != title)


def _move(rng, state, tools):
  event_id, title, shown = _titled(rng, state)
  date, time = _free_slot(rng, state)
  request = rng.choice(("Move {t} to {d} at {time}.", "Reschedule {t} to {d} {time}."))
  answer = Answer("Moved {t} to {d} at {time}.",
                  {"t": title, "d": R(-1, 0, ("date",)), "time": R(-1, 0, ("time",))})
  goal, _ = simulate(state, _T["move_event"], event_id=event_id, date=date, time=time)
  steps = ((Call("find_event", {"title": shown}),),
           (Call("move_event", {"event_id": R(0, 0, ("id",)), "date": date, "time": time}),))
  return Spec(request.format(t=shown, d=date, time=time), steps, answer, (date, time), goal,
              shown != title)


DOMAIN = domain(
  "calendar", TOOLS, _make_state,
  {
    "when": Kind(("find_event",), _when),
    "first_on": Kind(("list_events",), _first_on),
    "add": Kind(("create_event",), _add),
    "cancel": Kind(("delete_event", "find_event"), _cancel),
    "move": Kind(("find_event", "move_event"), _move),
  },
  ("You are {agent}, a calendar assistant. Use the tools and answer in one sentence.",
   "You are {agent}. You keep the user's calendar. Be brief."),
)
