"""Food delivery: one restaurant per cuisine with a priced menu, and the user's orders."""

from __future__ import annotations

from k2jax.agentic.domain import Answer, Call, Kind, R, Spec, domain, misspell
from k2jax.agentic.schema import declare
from k2jax.agentic.world import Tool, ToolError, lookup, simulate

_CUISINES = {
  "pizza": (("Luigi's", "Bella Napoli", "Pizza Roma"),
            ("Margherita", "Pepperoni", "Calzone", "Marinara", "Funghi")),
  "sushi": (("Sakura", "Tokyo Bento", "Kyoto Roll"),
            ("Salmon Roll", "Tuna Nigiri", "Miso Soup", "Edamame", "Dragon Roll")),
  "thai": (("Bangkok Bites", "Thai Orchid", "Lotus"),
           ("Pad Thai", "Green Curry", "Tom Yum", "Spring Rolls", "Mango Rice")),
  "mexican": (("Taco Loco", "El Charro", "Casa Verde"),
              ("Tacos", "Burrito", "Nachos", "Quesadilla", "Churros")),
  "indian": (("Curry House", "Spice Route", "Delhi Deli"),
             ("Butter Chicken", "Dal", "Samosa", "Naan", "Biryani")),
  "burger": (("Burger Barn", "Patty Shack", "Grill Stop"),
             ("Cheeseburger", "Veggie Burger", "Fries", "Onion Rings", "Milkshake")),
}
_STATUSES = ("preparing", "on the way", "delivered")


def _make_state(rng):
  restaurants = {}
  for cuisine in rng.sample(sorted(_CUISINES), 4):
    names, dishes = _CUISINES[cuisine]
    menu = {dish: rng.randint(4, 19) for dish in rng.sample(dishes, 3)}
    restaurants[rng.choice(names)] = {"cuisine": cuisine, "menu": menu}
  orders = {}
  for i in range(rng.randint(2, 3)):
    name = rng.choice(sorted(restaurants))
    item, price = rng.choice(sorted(restaurants[name]["menu"].items()))
    quantity = rng.randint(1, 3)
    status = _STATUSES[i] if i < 2 else rng.choice(_STATUSES)  # one order that can be cancelled.
    orders[f"F{101 + i}"] = {"restaurant": name, "item": item, "quantity": quantity,
                             "total": price * quantity, "status": status}
  return {"restaurants": restaurants, "orders": orders}


def _find_restaurants(state, cuisine):
  return [name for name, r in state["restaurants"].items() if r["cuisine"] == cuisine]


def _get_menu(state, restaurant):
  return lookup(state["restaurants"], restaurant, "restaurant", "restaurant")["menu"]


def _place_order(state, restaurant, item, quantity):
  menu = _get_menu(state, restaurant)
  price = lookup(menu, item, "item", f"item at {restaurant}:")
  order_id = f"F{101 + len(state['orders'])}"
  state["orders"][order_id] = {"restaurant": restaurant, "item": item, "quantity": quantity,
                               "total": price * quantity, "status": "preparing"}
  return {"order_id": order_id, "total": price * quantity}


def _order(state, order_id):
  if order_id not in state["orders"]:
    raise ToolError(f"unknown order {order_id!r}")
  return state["orders"][order_id]


def _order_status(state, order_id):
  return {"status": _order(state, order_id)["status"]}


def _cancel_order(state, order_id):
  order = _order(state, order_id)
  if order["status"] == "delivered":
    raise ToolError(f"order {order_id} was already delivered")
  order["status"] = "cancelled"
  return {"order_id": order_id, "status": "cancelled"}


_S = {"type": "string"}
_QUANTITY = {"type": "integer", "minimum": 1}
TOOLS = (
  Tool(declare("find_restaurants", "Restaurants serving a cuisine.", cuisine=_S),
       _find_restaurants),
  Tool(declare("get_menu", "Menu of a restaurant with prices.", restaurant=_S), _get_menu),
  Tool(declare("place_order", "Order an item from a restaurant.", restaurant=_S, item=_S,
               quantity=_QUANTITY), _place_order),
  Tool(declare("order_status", "Status of an order.", order_id=_S), _order_status),
  Tool(declare("cancel_order", "Cancel an order.", order_id=_S), _cancel_order),
)
_T = {t.name: t for t in TOOLS}
_ORDERED = Answer("Order {order_id} is placed, total {total}.",
                  {"order_id": R(-1, 0, ("order_id",)), "total": R(-1, 0, ("total",))})


def _dish(rng, state):
  restaurant = rng.choice(sorted(state["restaurants"]))
  item = rng.choice(sorted(state["restaurants"][restaurant]["menu"]))
  return restaurant, item


def _price(rng, state, tools):
  restaurant, item = _dish(rng, state)
  shown = misspell(rng, restaurant, list(state["restaurants"]))
  user = rng.choice(("How much is the {i} at {r}?", "What does {r} charge for the {i}?",
                     "Price of the {i} at {r}, please.")).format(i=item, r=shown)
  price = state["restaurants"][restaurant]["menu"][item]
  answer = Answer("The {i} at {r} costs {price}.",
                  {"i": item, "r": restaurant, "price": R(0, 0, (item,))})
  steps = ((Call("get_menu", {"restaurant": shown}),),)
  return Spec(user, steps, answer, (str(price),), typo=shown != restaurant)


def _ordering(state, user, steps, restaurant, item, quantity, typo=False):
  goal, out = simulate(state, _T["place_order"], restaurant=restaurant, item=item,
                       quantity=quantity)
  return Spec(user, steps, _ORDERED, (out["order_id"], str(out["total"])), goal, typo)


def _order_kind(rng, state, tools):
  restaurant, item = _dish(rng, state)
  quantity = rng.randint(1, 4)
  shown = misspell(rng, item, list(state["restaurants"][restaurant]["menu"]))
  user = rng.choice(("Order {q} {i} from {r}.", "Please get me {q} {i} from {r}.",
                     "I'd like {q} {i} from {r}.")).format(q=quantity, i=shown, r=restaurant)
  steps = ((Call("place_order", {"restaurant": restaurant, "item": shown,
                                 "quantity": quantity}),),)
  return _ordering(state, user, steps, restaurant, item, quantity, shown != item)


def _find_and_order(rng, state, tools):
  restaurant, item = _dish(rng, state)
  quantity = rng.randint(1, 4)
  cuisine = state["restaurants"][restaurant]["cuisine"]
  user = rng.choice(("Order {q} {i} from the {c} place.",
                     "Find the {c} restaurant and order {q} {i} there.")).format(
                       q=quantity, i=item, c=cuisine)
  steps = ((Call("find_restaurants", {"cuisine": cuisine}),),
           (Call("place_order", {"restaurant": R(0, 0, (0,)), "item": item,
                                 "quantity": quantity}),))
  return _ordering(state, user, steps, restaurant, item, quantity)


def _status(rng, state, tools):
  order_id = rng.choice(sorted(state["orders"]))
  user = rng.choice(("Where is my order {o}?", "What's the status of order {o}?")).format(
    o=order_id)
  answer = Answer("Order {o} is {status}.", {"o": order_id, "status": R(0, 0, ("status",))})
  steps = ((Call("order_status", {"order_id": order_id}),),)
  return Spec(user, steps, answer, (state["orders"][order_id]["status"],))


def _cancel(rng, state, tools):
  order_id = rng.choice(sorted(o for o, v in state["orders"].items() if v["status"] != "delivered"))
  user = rng.choice(("Cancel order {o}.", "Please cancel my order {o}.")).format(o=order_id)
  answer = Answer("Order {o} is {status}.", {"o": order_id, "status": R(0, 0, ("status",))})
  goal, _ = simulate(state, _T["cancel_order"], order_id=order_id)
  steps = ((Call("cancel_order", {"order_id": order_id}),),)
  return Spec(user, steps, answer, (order_id, "cancelled"), goal)


DOMAIN = domain(
  "food", TOOLS, _make_state,
  {
    "price": Kind(("get_menu",), _price),
    "order": Kind(("place_order",), _order_kind),
    "find_and_order": Kind(("find_restaurants", "place_order"), _find_and_order),
    "status": Kind(("order_status",), _status),
    "cancel": Kind(("cancel_order",), _cancel),
  },
  ("You are {agent}, a food delivery assistant. Use the tools and answer in one sentence.",
   "You are {agent}. You help users order food. Be brief."),
)
