"""ema_optim: an exponential moving average of the weights, kept inside the optimizer.

>>> import torch
>>> from ema_optim import EMAOptimizer, schedules
>>> model = torch.nn.Linear(4, 1)
>>> opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), decay=schedules.warmup(0.999))
"""

from . import posthoc, schedules
from ._average import ema_state_dict
from .optimizer import EMAOptimizer

__all__ = ["EMAOptimizer", "ema_state_dict", "posthoc", "schedules", "__version__"]
__version__ = "0.2.0"
