"""Float64 reference of the EMA rule in SPEC.md, written from the formulas, not from ema_optim.

`reference_shadows(initial, weights, ...)` takes the weights as they were when step() was
first called (before its update) and the weights after each optimizer step, all as float64
tensors, and returns the shadow after each step.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

Decay = Union[float, Callable[[int], float]]


def reference_shadows(
    initial: torch.Tensor,
    weights: Sequence[torch.Tensor],
    decay: Decay,
    update_after_step: int = 0,
    update_every: int = 1,
    bias_correction: bool = False,
) -> list[torch.Tensor]:
    ema = initial.double().clone()
    folded: list[tuple[float, torch.Tensor]] = []  # (decay, weight) of every EMA update
    out = []
    for n, w in enumerate(weights, start=1):
        w = w.double()
        if n <= update_after_step:
            ema = w.clone()
        elif (n - update_after_step) % update_every == 0:
            t = len(folded)
            d = float(decay(t)) if callable(decay) else float(decay)
            folded.append((d, w))
            if bias_correction:
                ema = _debiased(folded)
            else:
                ema = d * ema + (1.0 - d) * w
        out.append(ema.clone())
    return out


def _debiased(folded: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_i (1 - d_i) prod_{j>i} d_j w_i / (1 - prod_j d_j): an EMA from zero, debiased."""
    total = torch.zeros_like(folded[0][1])
    prod_all = 1.0
    for d, _ in folded:
        prod_all *= d
    if prod_all == 1.0:  # every decay was exactly 1: 0/0, whose limit is the arithmetic mean
        return sum(w for _, w in folded) / len(folded)
    for i, (d_i, w_i) in enumerate(folded):
        later = 1.0
        for d_j, _ in folded[i + 1 :]:
            later *= d_j
        total = total + (1.0 - d_i) * later * w_i
    return total / (1.0 - prod_all)
