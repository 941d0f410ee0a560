"""A library: books with an author and copies on the shelf; loans. The held-out domain."""

from __future__ import annotations

from k2jax.agentic.domain import Answer, Call, Kind, R, Spec, domain, misspell
from k2jax.agentic.schema import declare
from k2jax.agentic.world import Tool, ToolError, lookup, simulate

_BOOKS = {"Dune": "Frank Herbert", "Emma": "Jane Austen", "Persuasion": "Jane Austen",
          "Neuromancer": "William Gibson", "Beloved": "Toni Morrison", "Ulysses": "James Joyce",
          "Dubliners": "James Joyce", "Solaris": "Stanislaw Lem", "Rebecca": "Daphne du Maurier",
          "Middlemarch": "George Eliot", "Walden": "Henry Thoreau", "Frankenstein": "Mary Shelley"}


def _make_state(rng):
  by_author = {}
  for title in sorted(_BOOKS):
    by_author.setdefault(_BOOKS[title], []).append(title)
  titles = [rng.choice(by_author[a]) for a in rng.sample(sorted(by_author), 5)]  # one per author.
  books = {t: {"author": _BOOKS[t], "copies": rng.randint(0, 3)} for t in titles}
  for title in rng.sample(sorted(books), 3):
    books[title]["copies"] = max(books[title]["copies"], 1)  # some can be borrowed.
  loans = {f"L{101 + i}": {"title": t} for i, t in enumerate(rng.sample(sorted(books), 2))}
  return {"books": books, "loans": loans}


def _search_books(state, author):
  return [t for t, b in state["books"].items() if author.lower() in b["author"].lower()]


def _book_info(state, title):
  return lookup(state["books"], title, "title", "book")


def _borrow(state, title):
  book = _book_info(state, title)
  if book["copies"] == 0:
    raise ToolError(f"no copies of {title} left")
  book["copies"] -= 1
  loan_id = f"L{101 + len(state['loans'])}"
  state["loans"][loan_id] = {"title": title}
  return {"loan_id": loan_id}


def _return_book(state, loan_id):
  if loan_id not in state["loans"]:
    raise ToolError(f"unknown loan {loan_id!r}")
  title = state["loans"].pop(loan_id)["title"]
  state["books"][title]["copies"] += 1
  return {"returned": title}


_S = {"type": "string"}
TOOLS = (
  Tool(declare("search_books", "Books by an author.", author=_S), _search_books),
  Tool(declare("book_info", "Author and free copies of a book.", title=_S), _book_info),
  Tool(declare("borrow", "Borrow a book.", title=_S), _borrow),
  Tool(declare("return_book", "Return a borrowed book.", loan_id=_S), _return_book),
)
_T = {t.name: t for t in TOOLS}


def _book(rng, state, available=False):
  title = rng.choice(sorted(t for t, b in state["books"].items() if b["copies"] or not available))
  return title, misspell(rng, title, list(state["books"]))


def _author(rng, state, tools):
  title, shown = _book(rng, state)
  request = rng.choice(("Who wrote {t}?", "Who is the author of {t}?"))
  answer = Answer("{t} is by {a}.", {"t": title, "a": R(0, 0, ("author",))})
  steps = ((Call("book_info", {"title": shown}),),)
  return Spec(request.format(t=shown), steps, answer, (state["books"][title]["author"],),
              typo=shown != title)


def _copies(rng, state, tools):
  title, shown = _book(rng, state)
  request = rng.choice(("How many copies of {t} are free?", "Is {t} on the shelf?"))
  answer = Answer("{t} has {n} free copies.", {"t": title, "n": R(0, 0, ("copies",))})
  steps = ((Call("book_info", {"title": shown}),),)
  return Spec(request.format(t=shown), steps, answer, (str(state["books"][title]["copies"]),),
              typo=shown != title)


def _borrowing(state, request, steps, title, typo=False):
  goal, out = simulate(state, _T["borrow"], title=title)
  answer = Answer("Borrowed {t}, loan {loan}.", {"t": title, "loan": R(-1, 0, ("loan_id",))})
  return Spec(request, steps, answer, (title, out["loan_id"]), goal, typo)


def _borrow_kind(rng, state, tools):
  title, shown = _book(rng, state, available=True)
  request = rng.choice(("Borrow {t} for me.", "I'd like to borrow {t}."))
  steps = ((Call("borrow", {"title": shown}),),)
  return _borrowing(state, request.format(t=shown), steps, title, shown != title)


def _by_author(rng, state, tools):
  title = rng.choice(sorted(t for t, b in state["books"].items() if b["copies"]))
  author = state["books"][title]["author"]
  request = rng.choice(("Borrow the book by {a}.", "Get me the {a} book."))
  steps = ((Call("search_books", {"author": author}),),
           (Call("borrow", {"title": R(0, 0, (0,))}),))
  return _borrowing(state, request.format(a=author), steps, title)


def _return(rng, state, tools):
  loan_id = rng.choice(sorted(state["loans"]))
  request = rng.choice(("Return loan {l}.", "I'm done with loan {l}, return it."))
  answer = Answer("Returned {t}.", {"t": R(0, 0, ("returned",))})
  goal, _ = simulate(state, _T["return_book"], loan_id=loan_id)
  steps = ((Call("return_book", {"loan_id": loan_id}),),)
  return Spec(request.format(l=loan_id), steps, answer, (state["loans"][loan_id]["title"],), goal)


DOMAIN = domain(
  "library", TOOLS, _make_state,
  {
    "author": Kind(("book_info",), _author),
    "copies": Kind(("book_info",), _copies),
    "borrow": Kind(("borrow",), _borrow_kind),
    "by_author": Kind(("borrow", "search_books"), _by_author),
    "return": Kind(("return_book",), _return),
  },
  ("You are {agent}, a library assistant. Use the tools and answer in one sentence.",
   "You are {agent}. You help members of a library. Be brief."),
)
