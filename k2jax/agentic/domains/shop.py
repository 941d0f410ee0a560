"""A shop: products with a price and a stock; buying takes stock and makes an order."""

from __future__ import annotations

from k2jax.agentic.domain import Answer, Call, Kind, R, Spec, domain, misspell
from k2jax.agentic.schema import declare
from k2jax.agentic.world import Tool, ToolError, lookup, simulate

_PRODUCTS = ("Desk Lamp", "Coffee Mug", "Yoga Mat", "Water Bottle", "Backpack", "Notebook",
             "Headphones", "Phone Case", "Tea Kettle", "Wall Clock", "Umbrella", "Sunglasses",
             "Pillow", "Candle")


def _make_state(rng):
  products = {name: {"price": rng.randint(3, 60), "stock": rng.randint(0, 9)}
              for name in rng.sample(_PRODUCTS, 5)}
  for name in rng.sample(sorted(products), 3):
    products[name]["stock"] = max(products[name]["stock"], 4)  # some can be bought.
  orders = {}
  for i in range(rng.randint(2, 3)):
    name = rng.choice(sorted(products))
    quantity = rng.randint(1, 3)
    orders[f"S{101 + i}"] = {"product": name, "quantity": quantity,
                             "total": products[name]["price"] * quantity}
  return {"products": products, "orders": orders}


def _search_products(state, query):
  return [name for name in state["products"] if query.lower() in name.lower()]


def _get_product(state, name):
  return {"name": name, **lookup(state["products"], name, "name", "product")}


def _buy(state, name, quantity):
  product = lookup(state["products"], name, "name", "product")
  if product["stock"] < quantity:
    raise ToolError(f"only {product['stock']} {name} in stock")
  product["stock"] -= quantity
  order_id = f"S{101 + len(state['orders'])}"
  total = product["price"] * quantity
  state["orders"][order_id] = {"product": name, "quantity": quantity, "total": total}
  return {"order_id": order_id, "total": total}


def _get_order(state, order_id):
  if order_id not in state["orders"]:
    raise ToolError(f"unknown order {order_id!r}")
  return state["orders"][order_id]


_S = {"type": "string"}
TOOLS = (
  Tool(declare("search_products", "Products whose name contains a word.", query=_S),
       _search_products),
  Tool(declare("get_product", "Price and stock of a product.", name=_S), _get_product),
  Tool(declare("buy", "Buy a quantity of a product.", name=_S,
               quantity={"type": "integer", "minimum": 1}), _buy),
  Tool(declare("get_order", "Details of an order.", order_id=_S), _get_order),
)
_T = {t.name: t for t in TOOLS}
_BOUGHT = Answer("Order {order} is placed, total {total}.",
                 {"order": R(-1, 0, ("order_id",)), "total": R(-1, 0, ("total",))})


def _product(rng, state, in_stock=False):
  names = sorted(n for n, p in state["products"].items() if p["stock"] >= 4 or not in_stock)
  name = rng.choice(names)
  return name, misspell(rng, name, list(state["products"]))


def _price_stock(rng, state, tools):
  name, shown = _product(rng, state)
  request = rng.choice(("How much is the {p}, and is it in stock?", "Price and stock of the {p}?"))
  answer = Answer("The {p} costs {price}, {stock} in stock.",
                  {"p": R(0, 0, ("name",)), "price": R(0, 0, ("price",)),
                   "stock": R(0, 0, ("stock",))})
  product = state["products"][name]
  steps = ((Call("get_product", {"name": shown}),),)
  return Spec(request.format(p=shown), steps, answer,
              (name, str(product["price"]), str(product["stock"])), typo=shown != name)


def _compare(rng, state, tools):
  (a, shown_a), b = _product(rng, state), rng.choice(sorted(state["products"]))
  while b == a:
    b = rng.choice(sorted(state["products"]))
  request = rng.choice(("What do the {a} and the {b} cost?", "Prices of the {a} and the {b}?"))
  answer = Answer("The {a} costs {pa} and the {b} costs {pb}.",
                  {"a": R(0, 0, ("name",)), "pa": R(0, 0, ("price",)), "b": R(0, 1, ("name",)),
                   "pb": R(0, 1, ("price",))})
  steps = ((Call("get_product", {"name": shown_a}), Call("get_product", {"name": b})),)
  expect = tuple(s for p in (a, b) for s in (p, str(state["products"][p]["price"])))
  return Spec(request.format(a=shown_a, b=b), steps, answer, expect, typo=shown_a != a)


def _buying(state, request, steps, name, quantity, typo=False):
  goal, out = simulate(state, _T["buy"], name=name, quantity=quantity)
  return Spec(request, steps, _BOUGHT, (out["order_id"], str(out["total"])), goal, typo)


def _buy_kind(rng, state, tools):
  name, shown = _product(rng, state, in_stock=True)
  quantity = rng.randint(1, 4)
  request = rng.choice(("Buy {q} {p}.", "I want {q} of the {p}.")).format(q=quantity, p=shown)
  steps = ((Call("buy", {"name": shown, "quantity": quantity}),),)
  return _buying(state, request, steps, name, quantity, shown != name)


def _search_buy(rng, state, tools):
  name, _ = _product(rng, state, in_stock=True)
  query = name.split()[-1].lower()
  quantity = rng.randint(1, 4)
  request = rng.choice(("Search for '{w}' and buy {q} of it.", "Find the {w} and buy {q}."))
  steps = ((Call("search_products", {"query": query}),),
           (Call("buy", {"name": R(0, 0, (0,)), "quantity": quantity}),))
  return _buying(state, request.format(w=query, q=quantity), steps, name, quantity)


def _order_kind(rng, state, tools):
  order_id = rng.choice(sorted(state["orders"]))
  request = rng.choice(("What was in order {o}?", "Details of my order {o}, please."))
  answer = Answer("Order {o} was {q} {p} for {total}.",
                  {"o": order_id, "q": R(0, 0, ("quantity",)), "p": R(0, 0, ("product",)),
                   "total": R(0, 0, ("total",))})
  order = state["orders"][order_id]
  steps = ((Call("get_order", {"order_id": order_id}),),)
  return Spec(request.format(o=order_id), steps, answer,
              (str(order["quantity"]), order["product"], str(order["total"])))


DOMAIN = domain(
  "shop", TOOLS, _make_state,
  {
    "price_stock": Kind(("get_product",), _price_stock),
    "compare": Kind(("get_product",), _compare),
    "buy": Kind(("buy",), _buy_kind),
    "search_buy": Kind(("buy", "search_products"), _search_buy),
    "order": Kind(("get_order",), _order_kind),
  },
  ("You are {agent}, a shopping assistant. Use the tools and answer in one sentence.",
   "You are {agent}. You help customers of an online shop. Be brief."),
)
