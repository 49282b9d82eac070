"""Hot path of the EMA: grouping, the multi-tensor update and the in-place swap.

Kernels see flat tensor lists and plain scalars only, never optimizer state or
``param_groups``. Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

import functools
import sys
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
    """Shadow/param pairs that one foreach call can take: same devices, same dtypes."""

    shadows: list[Tensor]
    params: list[Tensor]
    # Shadow dtype differs from the param dtype (e.g. fp32 shadows of bf16 params), on one
    # device: how the params go through the cast scratch.
    casts: Optional[CastPlan] = None
    # Shadows offloaded to another device (ema_device="cpu"): the same shadows paired with
    # staging buffers on their device, which take the params' values before each update
    # (see _offload.py). The kernels below never see such a group, only its staged form.
    staged: Optional[Group] = None


class CastPlan(NamedTuple):
    """How a mixed group's params are cast into a small scratch, planned once with the grouping.

    Params that fit are packed into scratch-sized batches (the scratch views are shaped like
    the params, so one foreach copy casts a batch); larger params go through it in pieces.
    The params themselves are kept, not views of them, so ``p.data = ...`` is still seen.
    """

    batches: list[tuple[list[Tensor], list[Tensor], list[Tensor]]]  # (shadows, params, scratch views)
    large: list[tuple[Tensor, Tensor]]  # (shadow, param) pairs bigger than the scratch
    scratch: Tensor


def group_pairs(shadows: Sequence[Tensor], params: Sequence[Tensor]) -> list[Group]:
    """Group (shadow, param) pairs by (devices, dtypes); done once and cached by the optimizer."""
    buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for s, p in zip(shadows, params):
        s, p = local(s), local(p)
        key = (s.device, s.dtype, p.device, p.dtype)
        bucket = buckets.setdefault(key, ([], []))
        bucket[0].append(s)
        bucket[1].append(p)
    groups = []
    for (s_device, s_dtype, p_device, p_dtype), (ss, ps) in buckets.items():
        if offloaded(s_device, p_device):
            groups.append(Group(ss, ps, staged=_staging_group(ss, ps)))
        else:
            groups.append(Group(ss, ps, casts=plan_casts(ss, ps) if s_dtype != p_dtype else None))
    return groups


def offloaded(shadow_device: torch.device, param_device: torch.device) -> bool:
    """Whether such pairs take the offload pipeline (the tests force it on CPU-only machines)."""
    return shadow_device != param_device


def _staging_group(shadows: list[Tensor], params: list[Tensor]) -> Group:
    """The shadows paired with one staging buffer per param on the shadows' device, in the
    param's dtype and memory layout; pinned when CUDA is there, so the copies are asynchronous."""
    pin = torch.cuda.is_available() and shadows[0].device.type == "cpu"
    bufs = [empty_like_dense(p, p.dtype, s.device, pin_memory=pin) for s, p in zip(shadows, params)]
    casts = plan_casts(shadows, bufs) if shadows[0].dtype != bufs[0].dtype else None
    return Group(shadows, bufs, casts=casts)


def empty_like_dense(p: Tensor, dtype: torch.dtype, device: torch.device, pin_memory: bool) -> Tensor:
    """An empty tensor shaped like ``p``, with its strides if its memory is one dense block
    (e.g. channels_last), else contiguous; ``pin_memory`` for host buffers of CUDA params."""
    stride = p.stride() if flat(p) is not None else torch.empty(p.shape, device="meta").stride()
    return torch.empty_strided(p.shape, stride, dtype=dtype, device=device, pin_memory=pin_memory)


def plan_casts(shadows: list[Tensor], params: list[Tensor]) -> CastPlan:
    total = sum(p.numel() for p in params)
    size = min(CHUNK, max(SCRATCH_MIN, total // 32))
    scratch = torch.empty(size, dtype=shadows[0].dtype, device=shadows[0].device)
    batches, large = [], []
    batch: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    used = 0
    for s, p in zip(shadows, params):
        n = p.numel()
        if n > size:
            large.append((s, p))
            continue
        if used + n > size:
            batches.append(batch)
            batch, used = ([], [], []), 0
        batch[0].append(s)
        batch[1].append(p)
        batch[2].append(scratch.narrow(0, used, n).view(p.shape))
        used += n
    if batch[0]:
        batches.append(batch)
    return CastPlan(batches, large, scratch)


def copy_(groups: Sequence[Group]) -> None:
    """``ema <- weight`` for every pair."""
    for g in groups:
        torch._foreach_copy_(g.shadows, g.params)


def lerp_(groups: Sequence[Group], weight: Weight) -> None:
    """``ema <- ema + weight * (w - ema)``, i.e. ``ema <- d * ema + (1 - d) * w`` with ``weight = 1 - d``.

    ``weight`` is a Python float (eager: the fastest multi-tensor kernels take it as a
    kernel argument, no device read) or a 0-dim tensor on the shadows' device (under
    ``torch.compile``, or when the weight depends on device values such as GradScaler's
    ``found_inf``); neither form syncs.
    """
    for g in groups:
        if g.casts is not None:
            _cast_lerp_(g.casts, weight)
        else:
            _foreach_lerp_(g.shadows, g.params, weight)


def _weight_for(weight: Weight, like: Tensor) -> Weight:
    # A 0-dim tensor weight in the shadows' dtype and on their device (a no-op when it is).
    if isinstance(weight, Tensor):
        return weight.to(like.device, like.dtype, non_blocking=True)
    return weight


def _foreach_lerp_(shadows: list[Tensor], ends: list[Tensor], weight: Weight) -> None:
    # A 0-dim tensor weight goes in as a list: the Scalar overload would read it on the host.
    weight = _weight_for(weight, shadows[0])
    torch._foreach_lerp_(shadows, ends, [weight] * len(shadows) if isinstance(weight, Tensor) else weight)


def _cast_lerp_(plan: CastPlan, weight: Weight) -> None:
    # The lerp kernels want one dtype per pair, so low-precision params are cast into the
    # scratch first (a batch at a time) and then folded in with lerp's single rounding. This
    # measured 1.1-2.4x faster on CPU than mixed-dtype mul_/add_ (benchmarks/RESULTS.md) and
    # allocates nothing per step; the scratch is at most 4 MB.
    weight = _weight_for(weight, plan.scratch)
    for shadows, params, bufs in plan.batches:
        torch._foreach_copy_(bufs, params)
        _foreach_lerp_(shadows, bufs, weight)
    for s, p in plan.large:
        _lerp_in_pieces_(s, p, weight, plan.scratch)


def _lerp_in_pieces_(s: Tensor, p: Tensor, weight: Weight, scratch: Tensor) -> None:
    """Lerp a shadow toward a param of another dtype, one piece at a time through ``scratch``."""
    if flat(p) is None or not same_layout(s, p):  # rare: a param with gaps; one copy of it
        s.lerp_(p.to(s.dtype), weight)
        return
    size = scratch.numel()
    for s_piece, p_piece in zip(pieces(s, size), pieces(p, size)):
        moved = scratch.narrow(0, 0, p_piece.numel())
        moved.copy_(p_piece)
        s_piece.lerp_(moved, weight)


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


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Element i of flat(a) and of flat(b) are the same logical element."""
    return a.shape == b.shape and (a.stride() == b.stride() or a.is_contiguous() and b.is_contiguous())


def pieces(t: Tensor, size: Optional[int] = None) -> list[Tensor]:
    """Consecutive pieces of at most ``size`` (default CHUNK) elements of a dense tensor, in memory order."""
    size = size or CHUNK
    whole = flat(t)
    return list(whole.split(size)) if whole.numel() > size else [whole]


# ---------------------------------------------------------------------------------------------
# Swap. Three ways to put the EMA into a param and get the training value back bit for bit:
#   "exchange": same dtype: the two tensors trade values, a piece at a time through a scratch;
#   "pack":     bf16 param, fp32 shadow: the shadow's 32 bits keep the param's 16 training bits
#               plus the low 16 bits of the EMA; the param holds the EMA rounded to bf16, whose
#               rounding carry is a function of those low bits, so both come back exactly;
#   "pack16":   fp16 param, fp32 shadow: the param holds the EMA rounded to fp16, the shadow's
#               32 bits keep the 16 training bits and the rounding residual as an int16 count
#               of the EMA's finest fp32 step; exact while the EMA is in fp16's normal range;
#   "copy":     any other dtype pair, a param whose memory is not one dense block, or a shadow
#               that cannot be packed (a NaN; for fp16 an EMA outside fp16's normal range):
#               keep a copy of the param's training values.
# Exchange and pack work piece by piece, so the caller can record how far it got.
# ---------------------------------------------------------------------------------------------


def swap_method(shadow: Tensor, param: Tensor) -> str:
    shadow, param = local(shadow), local(param)
    if flat(param) is None or flat(shadow) is None or not same_layout(shadow, param):
        return "copy"
    if shadow.dtype == param.dtype:
        return "exchange"
    if shadow.dtype == torch.float32 and sys.byteorder == "little":
        return {torch.bfloat16: "pack", torch.float16: "pack16"}.get(param.dtype, "copy")
    return "copy"


def swap_pieces(shadow: Tensor, param: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The (shadow, param) pieces that exchange_/pack_/unpack_ take, for one pair."""
    return list(zip(pieces(local(shadow)), pieces(local(param))))


def exchange_(s: Tensor, p: Tensor) -> None:
    """Trade the values of two same-dtype pieces in place (self-inverse)."""
    scratch = p.clone()
    p.copy_(s)
    s.copy_(scratch)


def _on_param_device(kernel):
    """Run a pack kernel on an offloaded shadow piece through a copy on the param's device."""

    @functools.wraps(kernel)
    def run(s: Tensor, p: Tensor) -> None:
        work = s.to(p.device)  # the piece itself unless the shadow is offloaded
        kernel(work, p)
        if work is not s:
            s.copy_(work)

    return run


@_on_param_device
def pack_(s: Tensor, p: Tensor) -> None:
    """Put an fp32 EMA piece into a bf16 param piece; keep the training bits inside the shadow."""
    low, high = _halves(s)
    carry = low < 0  # the dropped low half is >= 0x8000: round up (half away from zero)
    train = p.view(torch.int16).clone()
    p.view(torch.int16).copy_(high + carry)  # int16 arithmetic wraps like the bit pattern
    high.copy_(train)


@_on_param_device
def unpack_(s: Tensor, p: Tensor) -> None:
    """Inverse of :func:`pack_`: training bits back into the param, the exact EMA into the shadow."""
    low, high = _halves(s)
    train = high.clone()
    high.copy_(p.view(torch.int16) - (low < 0).to(torch.int16))
    p.view(torch.int16).copy_(train)


def _halves(fp32: Tensor) -> tuple[Tensor, Tensor]:
    """Views of the low and high 16 bits of each element of a flat fp32 tensor (little-endian)."""
    pairs = fp32.view(torch.int16).view(-1, 2)
    return pairs[:, 0], pairs[:, 1]


@_on_param_device
def pack16_(s: Tensor, p: Tensor) -> None:
    """Put an fp32 EMA piece into an fp16 param piece; keep the training bits and the residual."""
    h = s.to(torch.float16)
    hf = h.float()
    residual = ((s - hf) / _finest_step(hf)).to(torch.int16)  # exact (Sterbenz), |.| <= 2**13
    train = p.view(torch.int16).clone()
    low, high = _halves(s)
    low.copy_(residual)
    high.copy_(train)
    p.copy_(h)


@_on_param_device
def unpack16_(s: Tensor, p: Tensor) -> None:
    """Inverse of :func:`pack16_`."""
    low, high = _halves(s)
    hf = p.float()
    residual, train = low.float(), high.clone()
    # both terms and their sum are exact in fp32; where() keeps the sign of a -0.0 EMA
    s.copy_(torch.where(residual == 0, hf, hf + residual * _finest_step(hf)))
    p.view(torch.int16).copy_(train)


def _finest_step(hf: Tensor) -> Tensor:
    """2 ** (exponent(hf) - 24): the fp32 spacing just below hf's binade, as an fp32 tensor."""
    exponent = (hf.view(torch.int32) >> 23) & 0xFF
    return ((exponent - 24).clamp(min=1) << 23).view(torch.float32)


SWAP_KERNELS = {"exchange": (exchange_, exchange_), "pack": (pack_, unpack_), "pack16": (pack16_, unpack16_)}


def packable(pairs: Sequence[tuple[Tensor, str]]) -> list[bool]:
    """Whether each (shadow, method) can be packed exactly, with one host read (swap time only).

    bf16: any EMA but NaN (whose bf16 rounding would not show as NaN); fp16: an EMA of 0 or in
    fp16's normal range (finite after rounding, magnitude >= 2**-14).
    """
    if not pairs:
        return []
    checks = []
    for shadow, method in pairs:
        s = local(shadow)
        if method == "pack":
            checks.append(~torch.isnan(s).any())
        else:
            h = s.to(torch.float16)
            checks.append((torch.isfinite(h) & ((h.float().abs() >= 2.0**-14) | (s == 0))).all())
    return torch.stack([c.to(checks[0].device) for c in checks]).tolist()
