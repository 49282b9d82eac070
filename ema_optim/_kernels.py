"""Hot path of the EMA: grouping, cast plans and the multi-tensor copy/lerp.

Kernels see flat tensor lists and plain scalars only, never optimizer state or
``param_groups``. Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

Weight = Union[float, Tensor]

# Elements per piece when swapping or moving large tensors: bounds every temporary to a few MB.
CHUNK = 1 << 20
# Cast scratch of a mixed-dtype group (bf16/fp16 params, fp32 shadows): at most CHUNK elements
# and at most 1/32 of the group, so it is never model-sized; at least SCRATCH_MIN elements.
SCRATCH_MIN = 1 << 12

try:  # DTensor params (FSDP2, tensor parallel): the kernels work on the local shards.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: the private path; or torch without distributed
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None  # type: ignore[assignment,misc]


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that writes through), else the tensor itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


class Group(NamedTuple):
    """Shadow/param pairs that one foreach call can take: same devices, same dtypes.

    ``shadows[k]`` lists shadow ``k`` of every param (one list per EMA), aligned with ``params``.
    """

    shadows: tuple[list[Tensor], ...]
    params: list[Tensor]
    # Shadow dtype differs from the param dtype (e.g. fp32 shadows of bf16 params), on one
    # device: how the params go through the cast scratch, once for all shadows.
    casts: Optional[CastPlan] = None
    # Shadows offloaded to another device (ema_device="cpu"): the same shadows paired with
    # staging buffers on their device, which take the params' values before each update
    # (see _offload.py). The kernels below never see such a group, only its staged form.
    staged: Optional[Group] = None


class CastPlan(NamedTuple):
    """How a mixed group's params are cast into a small scratch, planned once with the grouping.

    Params that fit are packed into scratch-sized batches (the scratch views are shaped like
    the params, so one foreach copy casts a batch for every shadow); larger params go through
    it in pieces. The params themselves are kept, not views of them, so ``p.data = ...`` is
    still seen.
    """

    batches: list[tuple[tuple[list[Tensor], ...], list[Tensor], list[Tensor]]]  # (shadows, params, views)
    large: list[tuple[tuple[Tensor, ...], Tensor]]  # (shadows, param) of params bigger than the scratch
    scratch: Tensor


def group_pairs(shadows: Sequence[Sequence[Tensor]], params: Sequence[Tensor]) -> list[Group]:
    """Group params and their shadows (``shadows[i]``: the shadows of ``params[i]``) by
    (devices, dtypes); done once and cached by the optimizer."""
    buckets: dict[tuple, tuple[list[list[Tensor]], list[Tensor]]] = {}
    for ss, p in zip(shadows, params):
        ss, p = [local(s) for s in ss], local(p)
        key = (ss[0].device, ss[0].dtype, p.device, p.dtype)
        bucket = buckets.setdefault(key, ([[] for _ in ss], []))
        for column, s in zip(bucket[0], ss):
            column.append(s)
        bucket[1].append(p)
    groups = []
    for (s_device, s_dtype, p_device, p_dtype), (columns, ps) in buckets.items():
        cols = tuple(columns)
        if offloaded(s_device, p_device):
            groups.append(Group(cols, ps, staged=_staging_group(cols, ps)))
        else:
            groups.append(Group(cols, ps, casts=plan_casts(cols, ps) if s_dtype != p_dtype else None))
    return groups


def offloaded(shadow_device: torch.device, param_device: torch.device) -> bool:
    """Whether such pairs take the offload pipeline (the tests force it on CPU-only machines)."""
    return shadow_device != param_device


def _staging_group(shadows: tuple[list[Tensor], ...], params: list[Tensor]) -> Group:
    """The shadows paired with one staging buffer per param on the shadows' device, in the
    param's dtype and memory layout; pinned when CUDA is there, so the copies are asynchronous."""
    device = shadows[0][0].device
    pin = torch.cuda.is_available() and device.type == "cpu"
    bufs = [empty_like_dense(p, p.dtype, device, pin_memory=pin) for p in params]
    casts = plan_casts(shadows, bufs) if shadows[0][0].dtype != bufs[0].dtype else None
    return Group(shadows, bufs, casts=casts)


def empty_like_dense(p: Tensor, dtype: torch.dtype, device: torch.device, pin_memory: bool) -> Tensor:
    """An empty tensor shaped like ``p``, with its strides if its memory is one dense block
    (e.g. channels_last), else contiguous; ``pin_memory`` for host buffers of CUDA params."""
    stride = p.stride() if flat(p) is not None else torch.empty(p.shape, device="meta").stride()
    return torch.empty_strided(p.shape, stride, dtype=dtype, device=device, pin_memory=pin_memory)


def plan_casts(shadows: tuple[list[Tensor], ...], params: list[Tensor]) -> CastPlan:
    total = sum(p.numel() for p in params)
    size = min(CHUNK, max(SCRATCH_MIN, total // 32))
    first = shadows[0][0]
    scratch = torch.empty(size, dtype=first.dtype, device=first.device)
    batches: list = []
    large = []
    batch: tuple[list[tuple[Tensor, ...]], list[Tensor], list[Tensor]] = ([], [], [])
    used = 0
    for i, p in enumerate(params):
        n = p.numel()
        ss = tuple(column[i] for column in shadows)
        if n > size:
            large.append((ss, p))
            continue
        if used + n > size:
            batches.append(batch)
            batch, used = ([], [], []), 0
        batch[0].append(ss)
        batch[1].append(p)
        batch[2].append(scratch.narrow(0, used, n).view(p.shape))
        used += n
    if batch[1]:
        batches.append(batch)
    # per batch: one shadow list per EMA, aligned with the batch's params
    batches = [(tuple(map(list, zip(*ss))), ps, views) for ss, ps, views in batches]
    return CastPlan(batches, large, scratch)


def copy_(groups: Sequence[Group]) -> None:
    """``ema <- weight`` for every pair and every shadow."""
    for g in groups:
        for column in g.shadows:
            torch._foreach_copy_(column, g.params)


def lerp_(groups: Sequence[Group], weights: Sequence[Weight], copies: Sequence[bool] = ()) -> None:
    """``ema_k <- ema_k + weights[k] * (w - ema_k)`` for every shadow ``k``, i.e.
    ``ema_k <- d_k * ema_k + (1 - d_k) * w`` with ``weights[k] = 1 - d_k``.

    Each weight is a Python float (eager: the fastest multi-tensor kernels take it as a
    kernel argument, no device read) or a 0-dim tensor on the shadows' device (under
    ``torch.compile``, or when the weight depends on device values such as GradScaler's
    ``found_inf``); neither form syncs. ``copies[k]``: weight ``k`` can be exactly 1 (a copy;
    a GradScaler skip makes it 0 on the device); the traced form keeps both ends exact, as
    eager's lerp is.
    """
    traced = torch.compiler.is_compiling()
    for g in groups:
        if traced:
            _traced_lerp_(g, weights, copies)
        elif g.casts is not None:
            _cast_lerp_(g.casts, weights)
        else:
            for column, w in zip(g.shadows, weights):
                _foreach_lerp_(column, g.params, w)


def _traced_lerp_(g: Group, weights: Sequence[Weight], copies: Sequence[bool]) -> None:
    # Under torch.compile: the lerp written out, ``ema + (w - ema) * weight`` (lerp's own formula
    # for weights below 0.5, within a rounding of it above), as foreach ops that Inductor fuses
    # into the inner optimizer's kernel: each weight read once, low-precision params cast in
    # registers, no scratch. The form is what makes the fusion pay (benchmarks/RESULTS.md):
    # - Inductor inlines these ops into each shadow's store. ``_foreach_lerp_``'s decomposition
    #   (both branches and a select) is stored to a buffer first, and the float32-only copy into
    #   the shadow then makes Inductor's CPU tiling pick the float32 vector width for the whole
    #   kernel: half the lanes of a bf16 inner update, whose per-iteration scalar work (Adam's
    #   bias corrections) then doubles per element (+0.9 of the step instead of +0.3, AdamW
    #   bf16 on AVX-512).
    # - A 0-dim tensor weight goes in through the Tensor overloads (decomposed, no host read);
    #   the List overload of ``_foreach_lerp_`` with tensor weights has no lowering (an ATen
    #   fallback into new buffers, then copies back).
    # - ``ema + (w - ema) * 1`` is not always ``w``: ``w - ema`` rounds at the shadow's magnitude
    #   (1 -> 1e-8 gives 0). Where a weight can be exactly 1 (``copies``: a decay of 0, a
    #   schedule, bias correction's first update, the copy phase under a GradScaler) the traced
    #   form selects the weights there, on the device, so a copy is exact and a GradScaler skip
    #   (weight 0) keeps the shadow. ``copies`` is fixed by the settings: never a new guard (from
    #   each step's weight it would recompile whenever a schedule reached 0). The select costs a
    #   little (about +0.1 of an fp32 AdamW step with two shadows), so other shadows skip it.
    dtype = g.shadows[0][0].dtype
    ends = g.params if g.params[0].dtype == dtype else [_as_stored(p).to(dtype) for p in g.params]
    for k, (column, w) in enumerate(zip(g.shadows, weights)):
        w = _weight_for(w, column[0])
        if not isinstance(w, Tensor) and w == 1:  # a Python float (the graph is specialized on it)
            torch._foreach_copy_(column, ends)
            continue
        step = torch._foreach_mul(torch._foreach_sub(ends, column), w)
        if isinstance(w, Tensor) and k < len(copies) and copies[k]:
            whole = w == 1  # not ``w > 0``: a complex shadow's weight is complex
            moved = torch._foreach_add(column, step)
            torch._foreach_copy_(column, [torch.where(whole, e, m) for e, m in zip(ends, moved)])
        else:
            torch._foreach_add_(column, step)


def _as_stored(p: Tensor) -> Tensor:
    # A bf16/fp16 param as stored, in float32. Inductor hands a fused kernel's later reads of a
    # low-precision result the float32 value it computed before rounding it (unless
    # ``emulate_precision_casts``), so the EMA would average weights the model never holds: up to
    # half an ulp of the param's dtype off, always the same way. The rounding is done again here
    # in float32 arithmetic, which Inductor keeps as written and vectorizes (reading the stored
    # bits instead makes it a scalar loop): Veltkamp's split ``t - (t - x)``, ``t = x * (2**s + 1)``,
    # rounds ``x`` to ``24 - s`` significant bits, ties to even, as the cast does. That needs
    # ``t`` rounded before the subtraction: Inductor's C++ is built with -ffp-contract=off; its
    # Triton kernels may fuse the multiply and subtract into an FMA, so on GPUs the read stays
    # as Inductor gives it.
    if p.dtype not in (torch.bfloat16, torch.float16) or p.device.type != "cpu":
        return p
    x = p.to(torch.float32)
    a = x.abs()
    if p.dtype == torch.bfloat16:  # 8 bits; exact for 2**-126 <= |x| < 2**112 (and 0), else x
        t = x * 65537.0
        return torch.where(a < 2.0**112, t - (t - x), x)
    t = x * 8193.0  # float16: 11 bits; its subnormals on a grid of 2**-24; inf from 65520 on
    r = torch.where(a < 2.0**-14, torch.copysign((a + 0.75) - 0.75, x), t - (t - x))
    return torch.where(a < 65520.0, r, x * math.inf)


def _weight_for(weight: Weight, like: Tensor) -> Weight:
    # A 0-dim tensor weight in the shadows' dtype and on their device (a no-op when it is).
    if isinstance(weight, Tensor):
        return weight.to(like.device, like.dtype, non_blocking=True)
    return weight


def _foreach_lerp_(shadows: list[Tensor], ends: list[Tensor], weight: Weight) -> None:
    # A 0-dim tensor weight goes in as a list: the Scalar overload would read it on the host.
    weight = _weight_for(weight, shadows[0])
    torch._foreach_lerp_(shadows, ends, [weight] * len(shadows) if isinstance(weight, Tensor) else weight)


def _cast_lerp_(plan: CastPlan, weights: Sequence[Weight]) -> None:
    # The lerp kernels want one dtype per pair, so low-precision params are cast into the
    # scratch first (a batch at a time, once for all shadows) and then folded in with lerp's
    # single rounding. This measured 1.1-2.4x faster on CPU than mixed-dtype mul_/add_
    # (benchmarks/RESULTS.md) and allocates nothing per step; the scratch is at most 4 MB.
    weights = [_weight_for(w, plan.scratch) for w in weights]
    for columns, params, bufs in plan.batches:
        torch._foreach_copy_(bufs, params)
        for column, w in zip(columns, weights):
            _foreach_lerp_(column, bufs, w)
    for ss, p in plan.large:
        _lerp_in_pieces_(ss, p, weights, plan.scratch)


def _lerp_in_pieces_(ss: tuple[Tensor, ...], p: Tensor, weights: Sequence[Weight], scratch: Tensor) -> None:
    """Lerp shadows toward a param of another dtype, one piece at a time through ``scratch``."""
    if flat(p) is None or not all(same_layout(s, p) for s in ss):  # rare: a param with gaps
        moved = p.to(ss[0].dtype)
        for s, w in zip(ss, weights):
            s.lerp_(moved, w)
        return
    size = scratch.numel()
    flat_ss = [dense_flat(s) for s in ss]
    for offset, p_piece in zip(range(0, p.numel(), size), pieces(p, size)):
        moved = scratch.narrow(0, 0, p_piece.numel())
        moved.copy_(p_piece)
        for s_flat, w in zip(flat_ss, weights):
            s_flat.narrow(0, offset, p_piece.numel()).lerp_(moved, w)


def flat(t: Tensor) -> Optional[Tensor]:
    """A 1-D view of all of a dense tensor's elements in memory order (contiguous, channels_last,
    transposed, ...), or None if its elements do not fill one block of memory."""
    if t.is_contiguous():
        return t.view(-1)
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel(),), (1,))


def dense_flat(t: Tensor) -> Tensor:
    """:func:`flat` of a tensor known to be dense (its elements fill one block of memory)."""
    whole = flat(t)
    assert whole is not None, "expected a dense tensor"
    return whole


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Element i of flat(a) and of flat(b) are the same logical element."""
    return a.shape == b.shape and (a.stride() == b.stride() or a.is_contiguous() and b.is_contiguous())


def pieces(t: Tensor, size: Optional[int] = None) -> list[Tensor]:
    """Consecutive pieces of at most ``size`` (default CHUNK) elements of a dense tensor, in memory order."""
    size = size or CHUNK
    whole = dense_flat(t)
    return list(whole.split(size)) if whole.numel() > size else [whole]
