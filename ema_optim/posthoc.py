"""Post-hoc EMA: choose the averaging length after training (Karras et al., EDM2).

Train with two or more power-function EMAs (:func:`ema_optim.schedules.power`), save a
:func:`snapshot` of them every few thousand updates, and after training :func:`reconstruct`
the power-function EMA of any ``sigma_rel`` at any snapshot time, as a least-squares
combination of the snapshots::

    opt = EMAOptimizer(inner, decay=(schedules.power(sigma_rel=0.05), schedules.power(sigma_rel=0.10)))
    ...
    if num_updates % 1000 == 0:
        torch.save(posthoc.snapshot(opt, model), f"snap-{num_updates:08d}.pt")
    ...
    ema = posthoc.reconstruct(sorted(glob.glob("snap-*.pt")), sigma_rel=0.15)
    model.load_state_dict(ema, strict=False)

The power-function EMA with exponent ``gamma`` after ``t`` EMA updates of the weights
``w_1..w_t`` is ``sum_s c_s w_s`` with
``c_s = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / t ** (gamma + 1)``: the average of the
piecewise-constant weight path under the profile
``p(tau) = (gamma + 1) * tau ** gamma / t ** (gamma + 1)`` on ``[0, t]``. Its width relative
to ``t`` is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``. Time is the
EMA update count, so ``update_every`` needs no correction.

Snapshot format (plain dicts, lists, ints, floats and tensors, so ``torch.save`` and
``torch.load(weights_only=True)`` handle it, and ``torch.distributed.checkpoint`` too)::

    {"version": 1,
     "ema_updates": 4096,                  # t, the optimizer's EMA update count
     "gamma": [16.97, 6.94],               # one per power shadow
     "shadows": [{key: tensor, ...}, ...]} # one dict per power shadow, same keys

Memory and storage: a snapshot holds ``shadows x params`` values in the shadow dtype (or the
``dtype`` you pass); :func:`reconstruct` keeps one snapshot and ``targets x params`` float64
accumulators in memory at a time.

References:
    Karras, Aittala, Lehtinen, Hellsten, Aila, Laine. `Analyzing and improving the training
    dynamics of diffusion models <https://arxiv.org/abs/2312.02696>`_, 2023 (Algorithms 2-3,
    Eq. 151). NVlabs/edm2 is the reference implementation.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._snapshot import VERSION, dtype_for, snapshot

__all__ = ["sigma_rel_to_gamma", "gamma_to_sigma_rel", "snapshot", "solve", "reconstruct"]

SIGMA_REL_MAX = 12.0**-0.5  # gamma = 0, the arithmetic mean (uniform profile)
# Beyond these the float64 arithmetic of the profiles overflows (the cubic below at gamma ~ 5e102,
# the inner products in solve at ~1e154); such a profile is the latest weights anyway: its decay
# (t / (t + 1)) ** (gamma + 1) is 0.0 for any t a run reaches.
GAMMA_MAX = 1e100
SIGMA_REL_MIN = 1e-100  # sigma_rel of GAMMA_MAX, to float64 precision
_TOO_SHORT = "; for an average that is just the latest weights use decay=0.0"

Snapshot = Union[Mapping[str, Any], str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------- gamma <-> sigma_rel


def _real(name: str, value: object, error: type[Exception] = TypeError, accepted: str = "") -> float:
    """``value`` as a float; ``error`` (TypeError for an argument, ValueError for a field of a
    snapshot) if it is not a real number. One beyond float64's range (an int such as
    ``10 ** 400``, where ``float()`` raises OverflowError) is out of range: ValueError, which
    names the ``accepted`` range if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        size = f"about 1e+{math.log10(abs(value)):.0f}" if isinstance(value, numbers.Integral) else "huge"
        raise ValueError(
            f"{name} is out of range: its magnitude ({size}) is beyond float64's (about 1.8e+308)"
            + (f"; it must be in {accepted}" if accepted else "")
        ) from None


def _check_number(name: str, value: object, error: type[Exception] = TypeError, accepted: str = "") -> float:
    value = _real(name, value, error, accepted)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_gamma(name: str, value: object, error: type[Exception] = TypeError) -> float:
    """A gamma in ``[0, GAMMA_MAX]``; ``error`` for a value that is not a number (see :func:`_real`)."""
    g = _check_number(name, value, error, accepted=f"[0, {GAMMA_MAX:g}]")
    if g < 0.0:
        raise ValueError(f"{name} must be >= 0, got {g} (gamma = 0 is the arithmetic mean)")
    if g > GAMMA_MAX:
        raise ValueError(
            f"{name}={g:g} is too large to compute with: use gamma <= {GAMMA_MAX:g} (sigma_rel >= "
            f"{SIGMA_REL_MIN:g}), beyond which float64 overflows{_TOO_SHORT}"
        )
    return g


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent ``gamma`` whose profile has relative width ``sigma_rel``.

    The largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0``, ``s = sigma_rel``
    (EDM2, Eq. 126 / Algorithm 2), found by Newton's method in float64.

    Args:
        sigma_rel: in ``(0, 12 ** -0.5]``; ``12 ** -0.5`` is ``gamma = 0``, the arithmetic mean.
            Below ``1e-100`` (``gamma`` above ``1e100``) float64 cannot evaluate the profile.

    Raises:
        ValueError: ``sigma_rel`` outside ``[1e-100, 12 ** -0.5]``.

    Example:
        >>> round(sigma_rel_to_gamma(0.05), 6), round(sigma_rel_to_gamma(0.10), 6)
        (16.972199, 6.937204)
    """
    s = _check_number("sigma_rel", sigma_rel, accepted=f"[{SIGMA_REL_MIN:g}, 12 ** -0.5]")
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel must be in (0, 12 ** -0.5 = {SIGMA_REL_MAX:.6f}], got {s}; "
            "12 ** -0.5 is the arithmetic mean, smaller values average over a shorter recent window"
        )
    if s < SIGMA_REL_MIN:
        raise ValueError(
            f"sigma_rel={s} is too small to compute with: its gamma would exceed {GAMMA_MAX:g}, beyond "
            f"float64's reach; use sigma_rel >= {SIGMA_REL_MIN:g}{_TOO_SHORT}"
        )
    q = s**-2
    # f(g) = (g + 2)^2 (g + 3) - q (g + 1) is convex for g > -7/3 and positive at g = 1/s, so
    # Newton's method from there descends monotonically onto the largest root (>= 0 as q >= 12).
    g = 1.0 / s
    for _ in range(100):
        f = ((g + 7.0) * g + 16.0 - q) * g + 12.0 - q
        slope = (3.0 * g + 14.0) * g + 16.0 - q
        nxt = g - f / slope
        if not nxt < g:
            break
        g = nxt
    return max(g, 0.0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width ``sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`` of a power profile.

    Args:
        gamma: the exponent, in ``[0, 1e100]`` (beyond, float64 cannot evaluate the profile).

    Raises:
        ValueError: ``gamma`` negative, above ``1e100`` or not finite.

    Example:
        >>> gamma_to_sigma_rel(0.0) == 12 ** -0.5
        True
    """
    g = _check_gamma("gamma", gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


# ---------------------------------------------------------------------------- solve


def _as_float64(name: str, values: Any) -> Tensor:
    try:
        out = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    except OverflowError:  # a Python int beyond float64
        raise ValueError(f"{name} is out of range: a value is beyond float64's (about 1.8e+308)") from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from err
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must be finite, got {out.tolist()}")
    return out


def _profiles(t_name: str, t: Any, gamma: Any) -> tuple[Tensor, Tensor]:
    g_name = "gamma_" + t_name[2:]
    t, gamma = _as_float64(t_name, t), _as_float64(g_name, gamma)
    if t.numel() != gamma.numel():
        raise ValueError(
            f"{t_name} and {g_name} must have the same length, got {t.numel()} and {gamma.numel()}"
        )
    if t.numel() == 0:
        raise ValueError(f"{t_name} must not be empty")
    if (t <= 0).any():
        raise ValueError(f"{t_name} must be > 0 (EMA updates), got {t.tolist()}")
    if (gamma < 0).any():
        raise ValueError(f"{g_name} must be >= 0, got {gamma.tolist()}")
    return t, gamma


def _inner_products(t_a: Tensor, g_a: Tensor, t_b: Tensor, g_b: Tensor) -> Tensor:
    """``<p_a, p_b>`` for every pair of power profiles ``p(tau) = (g + 1) tau^g / t^(g + 1)`` on ``[0, t]``.

    With ``t_lo <= t_hi`` the product is ``int_0^t_lo p_a p_b`` =
    ``(g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_hi) * (t_lo / t_hi) ** g_hi``, ``g_hi`` the exponent of
    the profile that ends at ``t_hi`` (EDM2 Eq. 151). Rows: profiles a; columns: profiles b.
    """
    t_a, g_a, t_b, g_b = t_a[:, None], g_a[:, None], t_b[None, :], g_b[None, :]
    t_hi = torch.maximum(t_a, t_b)
    g_hi = torch.where(t_a >= t_b, g_a, g_b)
    ratio = torch.minimum(t_a, t_b) / t_hi
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * ratio**g_hi


def solve(
    t_in: Sequence[float], gamma_in: Sequence[float], t_out: Sequence[float], gamma_out: Sequence[float]
) -> Tensor:
    """Coefficients ``X`` such that ``sum_i X[i, j] * input_i`` best approximates target profile ``j``.

    Each profile is a power-function EMA ending at time ``t`` (in EMA updates) with exponent
    ``gamma``. ``X`` solves the least-squares normal equations ``A X = B`` with the closed-form
    inner products ``A = <inputs, inputs>``, ``B = <inputs, targets>`` (EDM2 Eq. 151 /
    Algorithm 3), in float64; each column is then normalised to sum to 1, so that a constant
    weight comes back exactly.

    Args:
        t_in, gamma_in: the input profiles (e.g. every power shadow of every snapshot).
        t_out, gamma_out: the target profiles.

    Returns:
        A float64 tensor of shape ``(len(t_in), len(t_out))``.

    Raises:
        ValueError: mismatched lengths, ``t <= 0``, ``gamma < 0``, a singular system (e.g.
            the same input profile twice), or a target that the inputs cannot express (its
            coefficients sum to about 0, e.g. a target time far after the inputs').

    Example:
        >>> x = solve([100, 100, 200], [6.9, 17.0, 6.9], [200], [17.0])
        >>> tuple(x.shape), round(float(x.sum()), 12)
        ((3, 1), 1.0)
    """
    t_i, g_i = _profiles("t_in", t_in, gamma_in)
    t_o, g_o = _profiles("t_out", t_out, gamma_out)
    a = _inner_products(t_i, g_i, t_i, g_i)
    b = _inner_products(t_i, g_i, t_o, g_o)
    try:
        x = torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"the input profiles give a singular system ({err}); are some of them the same?"
        ) from err
    if not torch.isfinite(x).all():
        raise ValueError("the input profiles give a singular system; are some of them the same?")
    total = x.sum(dim=0)
    tiny = (total.abs() < 1e-8).nonzero().flatten().tolist()
    if tiny:  # normalising would blow up noise: the inputs hold (almost) nothing of this target
        j = tiny[0]
        raise ValueError(
            f"target {j} (t={t_o[j].item():g}, gamma={g_o[j].item():g}) barely overlaps the input profiles "
            f"(the least-squares coefficients sum to {total[j].item():.3g}, not about 1): it cannot be "
            f"expressed by them. Choose a target time within the inputs' (latest t: {t_i.max().item():g})."
        )
    return x / total


# ---------------------------------------------------------------------------- reconstruct


def _sources(snapshots: Any) -> list:
    """``snapshots`` as a list, refusing one path or one snapshot where a list is expected (a
    string would otherwise be read as a list of one-character paths)."""
    what = "snapshots must be a list of snapshot dicts or of paths"
    if isinstance(snapshots, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{what}, got a single path {os.fsdecode(snapshots)!r}; pass [path] for one file, or "
            "sorted(glob.glob(...)) for the snapshot files of a directory"
        )
    if isinstance(snapshots, Mapping):
        raise TypeError(
            f"{what}, got a single snapshot dict; pass a list of them, [snapshot, ...] (a "
            "reconstruction needs the snapshots of the whole run)"
        )
    try:
        return list(snapshots)
    except TypeError as err:
        raise TypeError(f"{what}, got {type(snapshots).__name__}") from err


def _load(source: Snapshot, where: str) -> Mapping[str, Any]:
    """A snapshot dict as is, or a saved one memory-mapped: its tensors are read from disk when used."""
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"each snapshot must be a dict from snapshot() or a path, got {type(source).__name__} ({where})"
        )
    if os.path.isdir(source):
        raise ValueError(
            f"{where} is a directory; pass the snapshot files in it, e.g. sorted(glob.glob(...))"
        )
    try:
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in torch's legacy format cannot be memory-mapped
            return torch.load(source, map_location="cpu", weights_only=True)
    except OSError:  # a missing or unreadable file: the error names it
        raise
    except Exception as err:  # noqa: BLE001 - torch.load's errors do not name the file
        raise ValueError(
            f"{where} could not be read ({type(err).__name__}: {err}); it may be truncated (a run "
            "stopped while saving) or not a file from torch.save(posthoc.snapshot(...)). Leave it out "
            "of the list (the reconstruction then has one snapshot less) or save it again."
        ) from err


def _header(snap: Mapping[str, Any], where: str) -> tuple[int, list[float], list]:
    """``(t, gammas, keys)`` of a snapshot, checked."""
    if not isinstance(snap, Mapping) or snap.get("version") != VERSION:
        raise ValueError(f"{where} is not a snapshot from ema_optim.posthoc.snapshot() (version {VERSION})")
    t, gammas, shadows = snap.get("ema_updates"), snap.get("gamma"), snap.get("shadows")
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"{where}: 'ema_updates' must be an int >= 0, got {t!r}")
    if (
        not isinstance(gammas, (list, tuple))
        or not isinstance(shadows, (list, tuple))
        or len(gammas) != len(shadows)
        or not gammas
        or not all(isinstance(s, Mapping) for s in shadows)
    ):
        raise ValueError(f"{where}: 'gamma' and 'shadows' must be lists of the same non-zero length")
    keys = list(shadows[0])
    if any(set(s) != set(keys) for s in shadows):
        raise ValueError(f"{where}: its shadows do not all have the same keys")
    return t, [_check_gamma(f"{where}: 'gamma'[{j}]", g, ValueError) for j, g in enumerate(gammas)], keys


def _targets(sigma_rel: Any, gamma: Any) -> tuple[list[float], bool]:
    """Target gammas, and whether a list was passed."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("pass exactly one of sigma_rel= or gamma= (a number, or a list of them)")
    value = sigma_rel if gamma is None else gamma
    many = isinstance(value, (list, tuple))
    values = list(value) if many else [value]
    if not values:
        raise ValueError("the list of targets is empty")
    if gamma is None:
        return [sigma_rel_to_gamma(v) for v in values], many
    return [_check_gamma("gamma", g) for g in values], many


def _target_step(times: list[int], step: Any) -> int:
    if step is None:
        return max(times)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int (an EMA update count), got {type(step).__name__}")
    if step not in times:
        raise ValueError(
            f"step={step} is not the time of any snapshot; the snapshots were taken at "
            f"ema_updates {sorted(set(times))}. Reconstruct at one of those."
        )
    return int(step)


def _inputs(headers: list[tuple[int, list[float], list]], target: int) -> list[tuple[int, int, int, float]]:
    """``(snapshot, shadow, t, gamma)`` of each distinct input profile with ``0 < t <= target``."""
    seen, inputs = set(), []
    for i in sorted(range(len(headers)), key=lambda i: headers[i][0]):  # the same sums in any order
        t, gammas, _ = headers[i]
        for j, g in enumerate(gammas):
            if 0 < t <= target and (t, g) not in seen:
                seen.add((t, g))
                inputs.append((i, j, t, g))
    if len(inputs) < 2:
        raise ValueError(
            f"only {len(inputs)} distinct power profile(s) at 0 < t <= {target}; a reconstruction needs two "
            "or more: track two power shadows, e.g. decay=(schedules.power(sigma_rel=0.05), "
            "schedules.power(sigma_rel=0.10)), and keep every snapshot"
        )
    return inputs


def _wanted_keys(
    headers: list[tuple[int, list[float], list]], used: list[int], where: list[str], keys: Any
) -> list:
    """The keys to reconstruct: ``keys`` if given (each in every snapshot used, ``used`` by
    time), else the keys of the snapshots used, which must then all have the same ones."""
    have = {i: set(headers[i][2]) for i in used}

    def first_with(key: Any) -> str:  # the first snapshot from which on every one used has it
        last_without = max(j for j in used if key not in have[j])
        return where[used[used.index(last_without) + 1]]

    if keys is not None:
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            raise TypeError(
                f"keys must be a list of snapshot keys, got {type(keys).__name__}; e.g. [{keys!r}]"
            )
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            raise ValueError("keys is empty; pass the snapshot keys to reconstruct, or keys=None for all")
        for key in wanted:
            if all(key not in have[i] for i in used):
                raise ValueError(f"{key!r} is in none of the snapshots used ({where[used[0]]} and later)")
            if key not in have[used[-1]]:
                raise ValueError(f"{key!r} is not in {where[used[-1]]}, the latest snapshot used")
            lacking = next((i for i in used if key not in have[i]), None)
            if lacking is not None:
                raise ValueError(
                    f"{where[lacking]} has no {key!r}; every snapshot used for a key must have it: "
                    f"reconstruct {key!r} from {first_with(key)} and later"
                )
        return wanted
    latest = headers[used[-1]][2]
    for i in used:
        dropped = [k for k in headers[i][2] if k not in have[used[-1]]]
        if dropped:
            raise ValueError(
                f"{where[i]} has the key {dropped[0]!r}, {where[used[-1]]} (the latest used) has not: "
                "are they from the same model, or did its param group leave the EMA ('ema': False)? "
                "Leave out the snapshots of another model, or reconstruct the keys that the latest "
                "snapshot has (keys=...)."
            )
        added = [k for k in latest if k not in have[i]]
        if added:
            more = f" (and {len(added) - 1} more)" if len(added) > 1 else ""
            since = first_with(added[0])
            raise ValueError(
                f"{added[0]!r}{more} is in {since} and later but not in {where[i]}, also used for this "
                "step: a param added with add_param_group has no snapshots from before it was added, "
                "so it cannot be reconstructed with the others. Reconstruct the keys that every "
                f"snapshot has from all of them (keys=..., e.g. the keys of {where[used[0]]}), and the "
                f"added ones from {since} and later (keys=[{added[0]!r}, ...]); or reconstruct at a "
                "step before they were added."
            )
    return list(latest)


def _result_dtype(dtype: torch.dtype, value: Tensor, key: Any, where: str) -> torch.dtype:
    """The dtype of ``key``'s result: ``dtype`` for a real tensor, its complex counterpart
    for a complex one (``dtype`` may name either: float32 and complex64 are the same choice)."""
    wide = dtype_for(value, dtype)
    if wide is None:
        raise ValueError(
            f"{where}: {key!r} is complex ({value.dtype}) and dtype={dtype} has no complex counterpart "
            "(torch's complex32 is experimental); pass dtype=torch.float32 (complex64 for complex keys) "
            "or torch.float64 (complex128), or reconstruct the complex keys apart (keys=...)"
        )
    return wide


def _accumulate_(
    acc: list[dict], shadow: Mapping, weights: Tensor, keys: list, where: str, first: dict, dtype: torch.dtype
) -> None:
    """Add ``weights[j] * shadow`` into target ``j``'s sums (float64, complex128 for a complex
    tensor). ``first`` keeps, per key, the shape, the result dtype and the place of the first
    tensor summed under it, to name both when another differs."""
    for key in keys:
        value = shadow[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        if key not in first:
            first[key] = (value.shape, _result_dtype(dtype, value, key, where), where)
        shape, result, seen = first[key]
        if value.shape != shape:
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, {seen} has {tuple(shape)}; the "
                "snapshots of one reconstruction must come from one model: leave out the others"
            )
        if value.is_complex() != result.is_complex:
            kind, other = ("complex", "real") if value.is_complex() else ("real", "complex")
            raise ValueError(
                f"{where}: {key!r} is {kind}, {seen} has it {other}; the snapshots of one "
                "reconstruction must come from one model: leave out the others"
            )
        for out, x in zip(acc, weights.tolist()):
            if key not in out:  # float64 sums; MPS has no float64
                wide = torch.float32 if value.device.type == "mps" else torch.float64
                out[key] = torch.zeros_like(value, dtype=wide.to_complex() if value.is_complex() else wide)
            out[key].add_(value, alpha=x)


def reconstruct(
    snapshots: Sequence[Snapshot],
    sigma_rel: Union[float, Sequence[float], None] = None,
    *,
    gamma: Union[float, Sequence[float], None] = None,
    step: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    keys: Optional[Iterable] = None,
) -> Union[dict, list[dict]]:
    """The power-function EMA of width ``sigma_rel`` (or exponent ``gamma``) at time ``step``, from snapshots.

    Every power shadow of every snapshot with ``0 < t <= step`` is one input profile (later
    snapshots never leak in; profiles that appear twice are used once); :func:`solve` finds
    the coefficients in float64 and the result is ``sum_i x_i * shadow_i``, summed in float64.
    Saved snapshots are opened memory-mapped (their headers first, their tensors read once,
    one snapshot at a time), so memory holds one snapshot plus one float64 sum per target.

    Args:
        snapshots: snapshot dicts from :func:`snapshot`, or paths of saved ones, in any order.
        sigma_rel: the target width(s), in ``(0, 12 ** -0.5]``; a list for several targets.
        gamma: the target exponent(s) instead of ``sigma_rel``.
        step: the target time in EMA updates; it must be the ``ema_updates`` of one snapshot.
            Default: the latest snapshot.
        dtype: dtype of the returned tensors; complex shadows (of complex params) come back
            in its complex counterpart (float32: complex64, float64: complex128), and a
            complex dtype may be passed for the same choice. The sums are float64 (complex128).
        keys: reconstruct only these keys (each must be in every snapshot used; others are
            ignored). Default: every key, which the snapshots used must then all have. Params
            added with ``add_param_group`` appear only in the snapshots taken after they were
            added: reconstruct the other keys from all snapshots and these from those snapshots
            (before it was added, a param's EMA is its weights when it was added, as in its
            tracked shadows).

    Returns:
        ``{key: tensor}`` with the snapshots' keys (``model.load_state_dict(result,
        strict=False)`` loads it when the snapshots were keyed by ``model``), or a list of
        such dicts when a list of targets is passed.

    Raises:
        TypeError: ``snapshots`` is one path or one snapshot instead of a list of them.
        ValueError: no or both of ``sigma_rel``/``gamma``, a value out of range, ``step`` not a
            snapshot time, fewer than two distinct input profiles, a singular system, or
            snapshots that are not from :func:`snapshot`, cannot be read, or disagree on their
            keys or shapes (the message names the snapshot, by index and path, and the key),
            e.g. keys added with ``add_param_group`` (see ``keys``); a complex key with a
            ``dtype`` that has no complex counterpart (float16, bfloat16).
    """
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"dtype must be a floating (or complex) torch.dtype, got {dtype!r}")
    targets, many = _targets(sigma_rel, gamma)
    sources = _sources(snapshots)
    if not sources:
        raise ValueError(
            "no snapshots given; pass the dicts from posthoc.snapshot() or the paths they were saved to"
        )
    where = [f"snapshot {i}" + ("" if isinstance(s, Mapping) else f" ({s})") for i, s in enumerate(sources)]
    headers = [_header(_load(s, w), w) for s, w in zip(sources, where)]
    target = _target_step([h[0] for h in headers], step)
    inputs = _inputs(headers, target)
    keys = _wanted_keys(headers, list(dict.fromkeys(i for i, *_ in inputs)), where, keys)
    x = solve([t for *_, t, _ in inputs], [g for *_, g in inputs], [target] * len(targets), targets)
    acc: list[dict] = [{} for _ in targets]
    first: dict = {}  # key -> (shape, result dtype, where) of the first tensor summed under it
    for i in dict.fromkeys(i for i, *_ in inputs):  # by time, each once
        shadows = _load(sources[i], where[i])["shadows"]
        for row, (snap, j, _, _) in enumerate(inputs):
            if snap == i:
                _accumulate_(acc, shadows[j], x[row], keys, f"{where[i]}, shadow {j}", first, dtype)
        del shadows  # one snapshot in memory at a time
    result = [{key: out[key].to(first[key][1]) for key in keys} for out in acc]
    return result if many else result[0]
