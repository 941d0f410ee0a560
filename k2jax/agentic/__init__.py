"""Synthesised tool-use worlds for agentic SFT, in miniature (K2 report, arXiv 2507.20534, §3.1).

Small deterministic domains (a JSON state and tools as pure Python functions), tasks with a
verifiable goal, a scripted expert whose conversations become SFT data, the rubric that keeps only
successful ones, and the JSONL they are written to. See docs/AGENTIC.md.

    tasks = make_tasks("train", 1000, seed=0)
    messages = expert_messages(tasks[0])     # OpenAI-style, K2 tool-call ids
    judge(tasks[0], messages)                # (True, "goal reached")
    world = tasks[0].new_world(); world.call("get_menu", {"restaurant": "Sakura"})
    write_jsonl("train.jsonl", tasks)        # {"written": ..., "dropped": ...}
"""

from k2jax.agentic.domains import DOMAINS, HELDOUT_DOMAIN
from k2jax.agentic.expert import expert_messages, next_action
from k2jax.agentic.jsonl import read_jsonl, write_jsonl
from k2jax.agentic.rubric import judge
from k2jax.agentic.schema import check_call, validate_arguments
from k2jax.agentic.tasks import SPLITS, Task, make_tasks, tool_combinations
from k2jax.agentic.world import ToolError, World

__all__ = [
  "DOMAINS",
  "HELDOUT_DOMAIN",
  "SPLITS",
  "Task",
  "ToolError",
  "World",
  "check_call",
  "expert_messages",
  "judge",
  "make_tasks",
  "next_action",
  "read_jsonl",
  "tool_combinations",
  "validate_arguments",
  "write_jsonl",
]
