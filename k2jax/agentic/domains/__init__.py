"""The domains, by name. HELDOUT_DOMAIN never appears in the train split.

Add a domain: a module here with its tools, `make_state` and kinds (see food.py), listed below.
"""

from k2jax.agentic.domains import calendar, feed, files, food, library, shop, units

DOMAINS = {d.DOMAIN.name: d.DOMAIN for d in (calendar, feed, files, food, library, shop, units)}
HELDOUT_DOMAIN = "library"
