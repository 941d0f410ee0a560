"""A social feed: users with followers and posts; the user likes, posts and follows."""

from __future__ import annotations

from k2jax.agentic.domain import Answer, Call, Kind, R, Spec, domain, misspell
from k2jax.agentic.schema import declare
from k2jax.agentic.world import Tool, ToolError, lookup, simulate

_HANDLES = ("@ana", "@ben", "@cleo", "@dev", "@eli", "@fay", "@gus", "@hana", "@ivo", "@jules",
            "@kai", "@lena", "@milo", "@nina")
_TEXTS = ("Lovely sunset today", "New blog post is up", "Coffee first", "Who is up for a run?",
          "Just finished a puzzle", "Rainy Monday again", "Learning to bake bread",
          "Best concert ever", "Reading a great book", "The garden is blooming",
          "Trying a new recipe", "Back from the mountains")


def _make_state(rng):
  me, *others = rng.sample(_HANDLES, 5)
  users = {u: {"followers": rng.randint(10, 999)} for u in others}
  authors = [u for u in others for _ in range(2)]
  rng.shuffle(authors)
  texts = rng.sample(_TEXTS, len(authors))
  posts = {f"p{i + 1}": {"author": a, "text": t, "likes": rng.randint(0, 50)}
           for i, (a, t) in enumerate(zip(authors, texts))}
  return {"me": me, "users": users, "following": sorted(rng.sample(others, 2)), "posts": posts}


def _user(state, user):
  return lookup(state["users"], user, "user", "user")


def _get_profile(state, user):
  posts = sum(p["author"] == user for p in state["posts"].values())
  return {"followers": _user(state, user)["followers"], "posts": posts}


def _get_posts(state, user):
  _user(state, user)
  posts = [{"id": i, "text": p["text"], "likes": p["likes"]}
           for i, p in state["posts"].items() if p["author"] == user]
  return posts[::-1][:3]  # newest first.


def _like_post(state, post_id):
  if post_id not in state["posts"]:
    raise ToolError(f"unknown post {post_id!r}")
  state["posts"][post_id]["likes"] += 1
  return {"post_id": post_id, "likes": state["posts"][post_id]["likes"]}


def _create_post(state, text):
  post_id = f"p{len(state['posts']) + 1}"
  state["posts"][post_id] = {"author": state["me"], "text": text, "likes": 0}
  return {"post_id": post_id}


def _follow(state, user):
  if user in state["following"]:
    raise ToolError(f"you already follow {user}")
  _user(state, user)["followers"] += 1
  state["following"] = sorted([*state["following"], user])
  return {"user": user, "followers": state["users"][user]["followers"]}


_S = {"type": "string"}
TOOLS = (
  Tool(declare("get_profile", "Follower and post counts of a user.", user=_S), _get_profile),
  Tool(declare("get_posts", "Latest posts of a user, newest first.", user=_S), _get_posts),
  Tool(declare("like_post", "Like a post.", post_id=_S), _like_post),
  Tool(declare("create_post", "Publish a post as the current user.", text=_S), _create_post),
  Tool(declare("follow", "Follow a user.", user=_S), _follow),
)
_T = {t.name: t for t in TOOLS}


def _someone(rng, state):
  user = rng.choice(sorted(state["users"]))
  return user, misspell(rng, user, list(state["users"]))


def _followers(rng, state, tools):
  user, shown = _someone(rng, state)
  request = rng.choice(("How many followers does {u} have?", "Follower count of {u}?"))
  answer = Answer("{u} has {n} followers.", {"u": user, "n": R(0, 0, ("followers",))})
  steps = ((Call("get_profile", {"user": shown}),),)
  expect = (str(state["users"][user]["followers"]),)
  return Spec(request.format(u=shown), steps, answer, expect, typo=shown != user)


def _latest(rng, state, tools):
  user, shown = _someone(rng, state)
  request = rng.choice(("What did {u} post last?", "Show me the latest post of {u}."))
  answer = Answer("{u} last posted: {text}", {"u": user, "text": R(0, 0, (0, "text"))})
  steps = ((Call("get_posts", {"user": shown}),),)
  return Spec(request.format(u=shown), steps, answer, (_get_posts(state, user)[0]["text"],),
              typo=shown != user)


def _like_latest(rng, state, tools):
  user = rng.choice(sorted(state["users"]))
  request = rng.choice(("Like the latest post by {u}.", "Please like {u}'s newest post."))
  answer = Answer("Liked {post}, it now has {likes} likes.",
                  {"post": R(1, 0, ("post_id",)), "likes": R(1, 0, ("likes",))})
  steps = ((Call("get_posts", {"user": user}),),
           (Call("like_post", {"post_id": R(0, 0, (0, "id"))}),))
  goal, out = simulate(state, _T["like_post"], post_id=_get_posts(state, user)[0]["id"])
  return Spec(request.format(u=user), steps, answer, (out["post_id"], str(out["likes"])), goal)


def _post(rng, state, tools):
  text = rng.choice([t for t in _TEXTS if all(p["text"] != t for p in state["posts"].values())])
  request = rng.choice(("Post this: {t}", "Share '{t}' on my feed."))
  answer = Answer("Posted as {post}.", {"post": R(0, 0, ("post_id",))})
  goal, out = simulate(state, _T["create_post"], text=text)
  steps = ((Call("create_post", {"text": text}),),)
  return Spec(request.format(t=text), steps, answer, (out["post_id"],), goal)


def _follow_kind(rng, state, tools):
  candidates = sorted(set(state["users"]) - set(state["following"]))
  user = rng.choice(candidates)
  shown = misspell(rng, user, list(state["users"]))
  request = rng.choice(("Follow {u}.", "Start following {u}, please."))
  answer = Answer("You now follow {u}, who has {n} followers.",
                  {"u": user, "n": R(0, 0, ("followers",))})
  goal, out = simulate(state, _T["follow"], user=user)
  steps = ((Call("follow", {"user": shown}),),)
  return Spec(request.format(u=shown), steps, answer, (user, str(out["followers"])), goal,
              shown != user)


DOMAIN = domain(
  "feed", TOOLS, _make_state,
  {
    "followers": Kind(("get_profile",), _followers),
    "latest": Kind(("get_posts",), _latest),
    "like_latest": Kind(("get_posts", "like_post"), _like_latest),
    "post": Kind(("create_post",), _post),
    "follow": Kind(("follow",), _follow_kind),
  },
  ("You are {agent}, a social media assistant. Use the tools and reply in one sentence.",
   "You are {agent}. You manage the user's social feed. Be brief."),
)
