"""The swap: the EMA into the params (and back, bit for bit) with no model-sized copy.

Ways to put the EMA into a param and get the training value back bit for bit:

- "exchange": same dtype: the two tensors trade values, a piece at a time through a scratch;
- "pack": bf16 param, fp32 shadow: the shadow's 32 bits keep the param's 16 training bits
  plus the low 16 bits of the EMA; the param holds the EMA rounded to bf16, whose rounding
  carry is a function of those low bits, so both come back exactly;
- "pack16": fp16 param, fp32 shadow: the param holds the EMA rounded to fp16, the shadow's
  32 bits keep the 16 training bits and the rounding residual as an int16 count of the EMA's
  finest fp32 step; exact while the EMA is in fp16's normal range;
- "pack64": fp32/bf16/fp16 param, float64 shadow: as pack16, with the training bits in the
  low 32 or 16 bits and the residual (a count of the EMA's finest float64 step) above them;
  exact while the EMA is 0 or in the param dtype's normal range;
- "copy": any other dtype pair (a shadow narrower than its param cannot hold the training
  bits), a param whose memory is not one dense block, a meta tensor, or a shadow that cannot
  be packed (a NaN; for pack16/pack64 an EMA outside the param dtype's normal range): keep a
  copy of the param's training values.

Exchange and pack work piece by piece; each :class:`Record` notes how far it got and the
param's tensor as it was, so :func:`swap_out` undoes exactly what was done, also after a
failure half-way or after the model replaced the param's data inside the block
(``model.float()``, ``model.to(memory_format=...)``, ``p.data = ...``).
"""

from __future__ import annotations

import functools
import sys
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _kernels
from ._kernels import flat, local, same_layout


def swap_method(shadow: Tensor, param: Tensor) -> str:
    shadow, param = local(shadow), local(param)
    if param.is_meta or shadow.is_meta:  # no values to keep: nothing to read on the host
        return "copy"
    if flat(param) is None or flat(shadow) is None or not same_layout(shadow, param):
        return "copy"
    if shadow.dtype == param.dtype:
        return "exchange"
    if shadow.dtype == torch.float64 and param.dtype in _TRAIN_BITS:
        return "pack64"
    if shadow.dtype == torch.float32 and sys.byteorder == "little":
        return {torch.bfloat16: "pack", torch.float16: "pack16"}.get(param.dtype, "copy")
    return "copy"


def swap_pieces(shadow: Tensor, param: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The (shadow, param) pieces that exchange_/pack_/unpack_ take, for one pair."""
    return list(zip(_kernels.pieces(local(shadow)), _kernels.pieces(local(param))))


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


@_on_param_device
def unpack_edited_(s: Tensor, p: Tensor) -> None:
    """:func:`unpack_` for the swap's undo, where the block may have edited the param in place.

    The shadow then takes the edited value to within half a bf16 step, except that a +-0
    param with a carry would wrap to NaN. Only a NaN shadow packs to that (0xFFFF + 1), and
    the swap copies NaN shadows instead of packing them, so here it is always an edit
    (``p.zero_()``, a pruning mask): drop the carry and the shadow takes the exact zero.
    """
    low, _ = _halves(s)
    low.masked_fill_((low < 0) & ((p.view(torch.int16) & 0x7FFF) == 0), 0)
    unpack_.__wrapped__(s, p)


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


# a param dtype that pack64_ takes: the same-width integer dtype and its width in bits
_TRAIN_BITS = {
    torch.float32: (torch.int32, 32),
    torch.bfloat16: (torch.int16, 16),
    torch.float16: (torch.int16, 16),
}


@_on_param_device
def pack64_(s: Tensor, p: Tensor) -> None:
    """Put a float64 EMA piece into an fp32/bf16/fp16 param piece (as ``p.copy_(s)`` would); the
    shadow's 64 bits keep the param's training bits (low) and the rounding residual (high), an
    integer count of the EMA's finest float64 step: |count| < 2**46, so both fit."""
    int_dtype, width = _TRAIN_BITS[p.dtype]
    h = s.to(p.dtype)
    hd = h.double()
    count = ((s - hd) / _finest_step64(hd)).to(torch.int64)  # exact (Sterbenz), see packable()
    train = p.view(int_dtype).to(torch.int64) & ((1 << width) - 1)
    s.view(torch.int64).copy_((count << width) | train)
    p.copy_(h)


@_on_param_device
def unpack64_(s: Tensor, p: Tensor) -> None:
    """Inverse of :func:`pack64_`."""
    int_dtype, width = _TRAIN_BITS[p.dtype]
    bits = s.view(torch.int64)
    count = bits >> width  # arithmetic: the signed count
    train = ((bits << (64 - width)) >> (64 - width)).to(int_dtype)  # sign-extended: exact
    hd = p.double()
    # both terms and their sum are exact in float64; where() keeps the sign of a -0.0 EMA
    s.copy_(torch.where(count == 0, hd, hd + count.double() * _finest_step64(hd)))
    p.view(int_dtype).copy_(train)


def _finest_step64(hd: Tensor) -> Tensor:
    """2 ** (exponent(hd) - 53): the float64 spacing just below hd's binade, as a float64 tensor."""
    exponent = (hd.view(torch.int64) >> 52) & 0x7FF
    return ((exponent - 53).clamp(min=1) << 52).view(torch.float64)


SWAP_KERNELS = {
    "pack64": (pack64_, unpack64_),
    "exchange": (exchange_, exchange_),
    "pack": (pack_, unpack_edited_),
    "pack16": (pack16_, unpack16_),
}


def packable(pairs: Sequence[tuple[Tensor, Tensor, str]]) -> list[bool]:
    """Whether each (shadow, param, method) can be packed exactly, with one host read (swap time only).

    bf16: any EMA but NaN (whose bf16 rounding would not show as NaN); fp16 (pack16) and a
    float64 shadow (pack64): an EMA of 0 or in the param dtype's normal range (finite after
    rounding, magnitude >= its smallest normal), where the residual is a whole number of the
    EMA's finest step.
    """
    if not pairs:
        return []
    checks = []
    for shadow, param, method in pairs:
        s = local(shadow)
        if method == "pack":
            checks.append(~torch.isnan(s).any())
        else:
            dtype = torch.float16 if method == "pack16" else param.dtype
            h = s.to(dtype)
            normal = h.to(s.dtype).abs() >= torch.finfo(dtype).tiny
            checks.append((torch.isfinite(h) & (normal | (s == 0))).all())
    return torch.stack([c.to(checks[0].device) for c in checks]).tolist()


class Record:
    """One tensor inside the swap: how it was swapped, how far, and its data as it was."""

    def __init__(self, p: Tensor, shadow: Tensor, method: str) -> None:
        self.p, self.shadow, self.method = p, shadow, method
        self.data = p.data  # the param's tensor now: put back if the block replaces it
        # Pieces are views of that data tensor, not of the param: a view of the param would
        # hold a reference to it, and torch.utils.swap_tensors (what model.float() uses under
        # torch.__future__.set_swap_module_params_on_conversion(True)) refuses such params.
        self.pieces = swap_pieces(shadow, self.data) if method != "copy" else []
        self.stash: Optional[Tensor] = None
        self.done = 0  # pieces swapped (1 for "copy" once the EMA is in)

    def __getstate__(self) -> dict:
        # A copy or pickle (taken inside the block) makes its pieces anew from its own tensors.
        return {k: v for k, v in self.__dict__.items() if k != "pieces"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pieces = swap_pieces(self.shadow, self.data) if self.method != "copy" else []

    def apply(self) -> None:
        if self.method == "copy":
            self.stash = self.p.detach().clone()
            self.p.copy_(self.shadow)
            self.done = 1
            return
        kernel = SWAP_KERNELS[self.method][0]
        for s_piece, p_piece in self.pieces:
            kernel(s_piece, p_piece)
            self.done += 1

    def ema(self) -> Tensor:
        """The EMA this shadow stands for while swapped, as a new tensor; nothing is touched
        (the undo runs on copies), so the block's own changes to the model stay."""
        if self.method == "copy":
            return self.shadow.detach().clone()
        shadow, data = self.shadow.detach().clone(), self.data.detach().clone()
        kernel = SWAP_KERNELS[self.method][1]
        for s_piece, p_piece in swap_pieces(shadow, data)[: self.done]:
            kernel(s_piece, p_piece)
        return shadow

    def undo(self) -> None:
        if not _same_tensor(self.p.data, self.data):
            self.p.data = self.data  # its pieces (views of this data) still hold the swap
        if self.method == "copy":
            if self.done:
                assert self.stash is not None  # apply() stashed the data before it set done
                self.data.copy_(self.stash)
            return
        kernel = SWAP_KERNELS[self.method][1]
        while self.done:
            kernel(*self.pieces[self.done - 1])
            self.done -= 1


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    a, b = local(a), local(b)
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
        and (a.is_meta or (a.data_ptr() == b.data_ptr()))
    )


@torch.no_grad()
def swap_in(pairs: Sequence[tuple[Tensor, Tensor]], records: list[Record]) -> None:
    """Put each shadow into its tensor. Each pair is recorded in ``records`` before it is
    touched, so that :func:`swap_out` can undo what was done if this fails half-way."""
    methods = [swap_method(s, p) for p, s in pairs]
    packs = [(s, p, m) for (p, s), m in zip(pairs, methods) if m.startswith("pack")]
    fits = iter(packable(packs))  # e.g. a NaN EMA must show as NaN: copy those
    methods = [m if not m.startswith("pack") or next(fits) else "copy" for m in methods]
    for (p, shadow), method in zip(pairs, methods):
        record = Record(p, shadow, method)
        records.append(record)
        record.apply()


@torch.no_grad()
def swap_out(records: list[Record]) -> None:
    """Restore everything in ``records`` (last first), then raise the first failure, if any."""
    error = None
    for record in reversed(records):
        try:
            record.undo()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            error = error or e
    if error is not None:
        raise error
