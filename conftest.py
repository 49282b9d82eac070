"""Doctest collection: skip modules whose optional dependency is not installed."""

import importlib.util

collect_ignore = [
    path for path, dep in [("ema_optim/lightning.py", "lightning")] if importlib.util.find_spec(dep) is None
]
