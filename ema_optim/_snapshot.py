"""``posthoc.snapshot``: what a post-hoc reconstruction needs from an EMAOptimizer now."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from . import _shadows
from ._average import model_names

VERSION = 1


def _power_shadows(opt: Any) -> list[tuple[int, float]]:
    """``(k, gamma)`` of each shadow of ``opt`` whose decay is a :func:`schedules.power` schedule."""
    from .schedules import _power_gamma  # here: schedules imports posthoc, which imports this module

    decays = opt.decay if isinstance(opt.decay, (tuple, list)) else (opt.decay,)
    gammas = [(k, _power_gamma(d)) for k, d in enumerate(decays)]
    found = [(k, g) for k, g in gammas if g is not None]
    if not found:
        raise ValueError(
            f"the optimizer has no power shadow (decay={opt.decay!r}); post-hoc EMA needs shadows "
            "with decay=schedules.power(...), e.g. decay=(schedules.power(sigma_rel=0.05), "
            "schedules.power(sigma_rel=0.10))"
        )
    return found


def _ema_updates(sd: Mapping[str, Any]) -> int:
    for group in sd["param_groups"]:
        t = group.get("ema_updates")
        if isinstance(t, int) and not isinstance(t, bool):
            return t
    raise ValueError(
        "the optimizer's state dict has no 'ema_updates' counter; snapshot() needs an EMAOptimizer"
    )


def _keys(
    opt: Any, model: Optional[torch.nn.Module], params: list[int], buffers: list[str]
) -> dict[Union[int, str], Union[int, str]]:
    """Snapshot key of each param (by state-dict index) and buffer (by its name in the
    buffers= module) that has shadows: its name in ``model`` when given (its key in
    ``ema_state_dict(opt, model)``), else the index or buffer name itself."""
    if model is None:
        return {**{i: i for i in params}, **{b: b for b in buffers}}
    names, buffer_names = model_names(opt, model)
    order = [p for g in opt.param_groups for p in g["params"]]
    missing = sorted(i for i in params if id(order[i]) not in names)
    if missing:
        raise ValueError(
            f"params {missing} of the optimizer are not parameters of the model passed to snapshot(); "
            "pass the model the optimizer trains, or model=None to key the shadows by param index"
        )
    outside = [b for b in buffers if b not in buffer_names]
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise ValueError(
            f"the averaged buffer {outside[0]!r}{more} of the buffers= module is not in the model passed "
            "to snapshot(), so it has no name there to be loaded under; pass the model that holds the "
            "buffers= module too (its names key the snapshot), or model=None to key the params by index "
            "and the buffers by their names in the buffers= module"
        )
    return {**{i: names[id(order[i])] for i in params}, **{b: buffer_names[b] for b in buffers}}


def dtype_for(value: Tensor, dtype: torch.dtype) -> Optional[torch.dtype]:
    """``dtype`` (which may name a real or a complex dtype: float32 and complex64 are one choice)
    for ``value``: the real one for a real tensor; for a complex one its complex counterpart
    (float32: complex64; float64: complex128), None for float16 (torch's complex32 is
    experimental) and bfloat16."""
    real = dtype.to_real()
    if not value.is_complex():
        return real
    return real.to_complex() if real in (torch.float32, torch.float64) else None


def _named(k: int, key: Union[int, str]) -> str:
    return f"the shadow {_shadows.key(k)!r} of " + (f"param {key}" if isinstance(key, int) else repr(key))


def _copy_dtype(value: Tensor, dtype: Optional[torch.dtype], k: int, key: Union[int, str]) -> torch.dtype:
    """``dtype`` for a real shadow, its complex counterpart for a complex one (so that no cast
    drops an imaginary part); the shadow dtype if ``dtype`` is None."""
    if dtype is None:
        return value.dtype
    wide = dtype_for(value, dtype)
    if wide is None:
        raise ValueError(
            f"snapshot(dtype={dtype}): {_named(k, key)} is complex ({value.dtype}) and {dtype} has no "
            "complex counterpart; take the snapshot in torch.float32 (complex64 for complex shadows) "
            "or in the shadow dtype (dtype=None)"
        )
    return wide


def _copy(value: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return value.detach().to(dtype=dtype or value.dtype, copy=True)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _check_range(copies: list[tuple[int, Union[int, str], Tensor, Tensor]], dtype: torch.dtype) -> None:
    """Refuse a snapshot whose cast to ``dtype`` turned finite values into inf (fp16 beyond 65504).

    One flag per tensor, read on the host once for the whole snapshot. Values that were already
    inf or NaN are kept as they are: the dtype did not make them. Under FSDP2 each rank checks
    its own shards.
    """
    if not copies:
        return
    flags = [(torch.isinf(_local(c)) & torch.isfinite(_local(v))).any() for _, _, v, c in copies]
    device = flags[0].device
    overflowed = torch.stack([f.to(device) for f in flags]).tolist()
    bad = [(k, key, v) for (k, key, v, _), over in zip(copies, overflowed) if over]
    if bad:
        k, key, value = bad[0]
        top = _local(value).abs().max().item()
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"snapshot(dtype={dtype}): {_named(k, key)}{more} holds values up to "
            f"{top:.4g}, beyond what {dtype} can hold (max {torch.finfo(dtype).max:.6g}); they would be "
            "saved as inf. Take the snapshot in torch.bfloat16 (float32's range, half the storage) or in the "
            "shadow dtype (dtype=None)."
        )


def snapshot(opt: Any, model: Optional[torch.nn.Module] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """What :func:`reconstruct` needs from ``opt`` now: its EMA update count and its power shadows.

    Call it every N EMA updates (after ``opt.step()``) and ``torch.save`` the result; keep every
    snapshot of the run (old ones matter for the reconstruction).

    Args:
        opt: an :class:`~ema_optim.EMAOptimizer` with one or more ``schedules.power`` shadows.
            Other shadows are left out. Offloaded updates are waited for; inside
            ``swap_ema_weights()`` the shadows are still the averages.
        model: if given, the shadows are keyed by their names in ``model``, params and
            averaged buffers alike (the keys of ``ema_state_dict(opt, model)``, so the
            reconstruction loads with ``model.load_state_dict(result, strict=False)``, also
            when ``buffers=`` was a submodule); otherwise params by the indices of
            ``opt.state_dict()`` and buffers by their names in the ``buffers=`` module. Params
            of a group turned out of the EMA (``"ema": False``) are left out: their shadows
            stopped.
        dtype: store the shadows in this dtype (``torch.float16`` halves the storage of float32
            shadows at the cost of about 3-5e-3 in the reconstruction error); default the
            shadow dtype. Complex shadows (of complex params) are stored in its complex
            counterpart (float32: complex64, float64: complex128; a complex dtype may be passed
            for the same choice); float16 and bfloat16 have none (``ValueError``). The tensors
            are copies on the shadows' device. A value that the dtype cannot hold (beyond 65504
            in float16, e.g. a BatchNorm ``running_var``) is refused rather than saved as inf.

    Returns:
        ``{"version": 1, "ema_updates": int, "gamma": [float, ...], "shadows": [{key: Tensor}, ...]}``.

    Raises:
        ValueError: no power shadow, no shadows yet (take snapshots after ``opt.step()``), a
            param or averaged buffer of ``opt`` missing from ``model``, a finite value that
            ``dtype`` would turn into inf, or a complex shadow with a ``dtype`` that has no
            complex counterpart (the message names its key).
    """
    if dtype is not None and (
        not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex)
    ):
        raise TypeError(f"dtype must be a floating (or complex) torch.dtype or None, got {dtype!r}")
    power = _power_shadows(opt)
    sd = opt.state_dict()
    # Params whose group left the EMA ("ema": False) keep their shadows as they were: stale, not
    # the power EMA at ema_updates, so they are left out (buffer shadows go with the EMA anyway).
    stale = {i for g in sd["param_groups"] if g.get("ema", True) is False for i in g.get("params", ())}
    found: list[dict[Union[int, str], Tensor]] = []  # per power shadow: by param index or buffer name
    for k, _ in power:
        key = _shadows.key(k)
        params: dict[Union[int, str], Tensor] = {}
        buffers: dict[Union[int, str], Tensor] = {}
        for i, s in sd["state"].items():
            for name, value in s.items() if isinstance(s, Mapping) else ():
                if name == key and i not in stale:
                    params[i] = value
                elif _shadows.is_buffer_key(name) and _shadows.split_buffer_key(name)[0] == key:
                    buffers[_shadows.split_buffer_key(name)[1]] = value
        found.append({**params, **buffers})
    if not any(found):
        raise ValueError("the optimizer has no shadows yet; take snapshots after opt.step()")
    keys = _keys(
        opt,
        model,
        list(dict.fromkeys(i for f in found for i in f if isinstance(i, int))),
        list(dict.fromkeys(b for f in found for b in f if isinstance(b, str))),
    )
    shadows = [
        {keys[i]: _copy(v, _copy_dtype(v, dtype, k, keys[i])) for i, v in f.items()}
        for (k, _), f in zip(power, found)
    ]
    if dtype is not None:
        _check_range(
            [
                (k, keys[i], v, copy[keys[i]])
                for (k, _), f, copy in zip(power, found, shadows)
                for i, v in f.items()
                if v.dtype != copy[keys[i]].dtype
            ],
            dtype.to_real(),
        )
    return {
        "version": VERSION,
        "ema_updates": _ema_updates(sd),
        "gamma": [g for _, g in power],
        "shadows": shadows,
    }
