"""Unit conversion (fixed factors) and currency exchange (rates that differ between worlds)."""

from __future__ import annotations

from k2jax.agentic.domain import Answer, Call, Kind, R, Spec, domain
from k2jax.agentic.schema import declare
from k2jax.agentic.world import Tool, ToolError

# Size of each unit in its dimension's base unit (metre, kilogram, litre); temperatures apart.
_FACTORS = {
  "length": {"m": 1.0, "km": 1000.0, "mi": 1609.344, "ft": 0.3048},
  "mass": {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125},
  "volume": {"l": 1.0, "ml": 0.001, "gal": 3.785411784},
  "temperature": {"C": None, "F": None},
}
_DIMENSION = {unit: dim for dim, units in _FACTORS.items() for unit in units}
_CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF")
_RATE_RANGES = {"USD": (1.0, 1.3), "GBP": (0.8, 0.9), "JPY": (140.0, 170.0), "CHF": (0.9, 1.0)}


def _make_state(rng):
  rates = {"EUR": 1.0, **{c: round(rng.uniform(*r), 2) for c, r in _RATE_RANGES.items()}}
  return {"eur_rates": rates}


def _convert(state, value, from_unit, to_unit):
  dim = _DIMENSION[from_unit]
  if _DIMENSION[to_unit] != dim:
    raise ToolError(f"cannot convert {dim} ({from_unit}) to {_DIMENSION[to_unit]} ({to_unit})")
  if dim == "temperature":
    out = value if from_unit == to_unit else (value * 9 / 5 + 32 if from_unit == "C"
                                              else (value - 32) * 5 / 9)
  else:
    out = value * _FACTORS[dim][from_unit] / _FACTORS[dim][to_unit]
  return {"value": round(out, 2), "unit": to_unit}


def _rate(state, from_currency, to_currency):
  return state["eur_rates"][to_currency] / state["eur_rates"][from_currency]


def _exchange(state, amount, from_currency, to_currency):
  return {"amount": round(amount * _rate(state, from_currency, to_currency), 2),
          "currency": to_currency}


def _get_rate(state, from_currency, to_currency):
  return {"rate": round(_rate(state, from_currency, to_currency), 4)}


def _list_units(state, dimension):
  return list(_FACTORS[dimension])


_UNIT = {"type": "string", "enum": list(_DIMENSION)}
_CURRENCY = {"type": "string", "enum": list(_CURRENCIES)}
TOOLS = (
  Tool(declare("convert", "Convert a value between units.", value={"type": "number"},
               from_unit=_UNIT, to_unit=_UNIT), _convert),
  Tool(declare("exchange", "Exchange an amount of money.", amount={"type": "number", "minimum": 0},
               from_currency=_CURRENCY, to_currency=_CURRENCY), _exchange),
  Tool(declare("get_rate", "Exchange rate between two currencies.", from_currency=_CURRENCY,
               to_currency=_CURRENCY), _get_rate),
  Tool(declare("list_units", "Units of a dimension.",
               dimension={"type": "string", "enum": list(_FACTORS)}), _list_units),
)


def _units(rng, k):
  """`k` distinct units of one dimension."""
  dimension = rng.choice(sorted(d for d, units in _FACTORS.items() if len(units) >= k))
  return rng.sample(list(_FACTORS[dimension]), k)


def _amount(rng):
  return rng.choice((rng.randint(1, 500), round(rng.uniform(0.5, 99.0), 1)))


def _convert_kind(rng, state, tools):
  a, b = _units(rng, 2)
  value = _amount(rng)
  request = rng.choice(("Convert {v} {a} to {b}.", "How many {b} is {v} {a}?"))
  answer = Answer("{v} {a} is {x} {b}.", {"v": value, "a": a, "x": R(0, 0, ("value",)),
                                          "b": R(0, 0, ("unit",))})
  steps = ((Call("convert", {"value": value, "from_unit": a, "to_unit": b}),),)
  expect = (str(_convert(state, value, a, b)["value"]), b)
  return Spec(request.format(v=value, a=a, b=b), steps, answer, expect)


def _convert_twice(rng, state, tools):
  a, b, c = _units(rng, 3)
  value = _amount(rng)
  request = rng.choice(("Convert {v} {a} to {b}, then that to {c}.",
                        "Turn {v} {a} into {b} and the result into {c}."))
  answer = Answer("{v} {a} is {x} {b}, which is {y} {c}.",
                  {"v": value, "a": a, "x": R(0, 0, ("value",)), "b": R(0, 0, ("unit",)),
                   "y": R(1, 0, ("value",)), "c": R(1, 0, ("unit",))})
  steps = ((Call("convert", {"value": value, "from_unit": a, "to_unit": b}),),
           (Call("convert", {"value": R(0, 0, ("value",)), "from_unit": b, "to_unit": c}),))
  x = _convert(state, value, a, b)["value"]
  expect = (str(x), b, str(_convert(state, x, b, c)["value"]), c)
  return Spec(request.format(v=value, a=a, b=b, c=c), steps, answer, expect)


def _exchange_kind(rng, state, tools):
  a, b = rng.sample(_CURRENCIES, 2)
  amount = _amount(rng)
  request = rng.choice(("How much is {v} {a} in {b}?", "Exchange {v} {a} to {b}."))
  answer = Answer("{v} {a} is {x} {b}.", {"v": amount, "a": a, "x": R(0, 0, ("amount",)),
                                          "b": R(0, 0, ("currency",))})
  steps = ((Call("exchange", {"amount": amount, "from_currency": a, "to_currency": b}),),)
  expect = (str(_exchange(state, amount, a, b)["amount"]), b)
  return Spec(request.format(v=amount, a=a, b=b), steps, answer, expect)


def _rate_kind(rng, state, tools):
  a, b = rng.sample(_CURRENCIES, 2)
  request = rng.choice(("What is the {a} to {b} rate?", "How many {b} for one {a}?"))
  answer = Answer("1 {a} is {x} {b}.", {"a": a, "b": b, "x": R(0, 0, ("rate",))})
  steps = ((Call("get_rate", {"from_currency": a, "to_currency": b}),),)
  return Spec(request.format(a=a, b=b), steps, answer, (str(_get_rate(state, a, b)["rate"]),))


def _units_of(rng, state, tools):
  dimension = rng.choice(sorted(_FACTORS))
  request = rng.choice(("Which {d} units do you know?", "List the {d} units."))
  answer = Answer("For {d} I know {units}.", {"d": dimension, "units": R(0, 0)})
  steps = ((Call("list_units", {"dimension": dimension}),),)
  return Spec(request.format(d=dimension), steps, answer, tuple(_FACTORS[dimension]))


DOMAIN = domain(
  "units", TOOLS, _make_state,
  {
    "convert": Kind(("convert",), _convert_kind),
    "convert_twice": Kind(("convert",), _convert_twice),
    "exchange": Kind(("exchange",), _exchange_kind),
    "rate": Kind(("get_rate",), _rate_kind),
    "units_of": Kind(("list_units",), _units_of),
  },
  ("You are {agent}, a conversion assistant. Use the tools and answer in one sentence.",
   "You are {agent}. You convert units and currencies. Be brief."),
)
