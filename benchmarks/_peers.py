"""The methods a benchmark case compares: ema_optim's step, and every EMA peer as one table row.

A peer is data: where its class lives and how to build it over a case's model; one skeleton
(``build``) imports it, builds it, runs its first update (peers copy on the first call) and
turns any failure into a ``skipped: <reason>`` row. Only ema_optim's public API is used.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import pathlib
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

DECAY = 0.999
WEIGHT = 1.0 - DECAY
IMPORT_NOTES: dict[str, str] = {}


class ParamList(nn.Module):
    """A model that is just a list of parameters (what the peers that deep-copy need)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.ps = nn.ParameterList(
            nn.Parameter(torch.randn(shape, device=device).to(dtype)) for shape in shapes
        )


def transformer_shapes(layers: int) -> tuple[tuple[int, ...], ...]:
    """The param shapes of a ``TransformerEncoder`` (d_model 512, 8 heads, ffn 2048)."""
    layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True, device="meta")
    model = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
    return tuple(tuple(p.shape) for p in model.parameters())


@dataclass
class Case:
    name: str
    describe: str
    model: nn.Module
    train: bool = False  # also measure the training-step overhead on this case

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    @property
    def mixed(self) -> bool:
        """bf16/fp16 params: every method keeps fp32 shadows where it can."""
        return self.params[0].dtype in (torch.bfloat16, torch.float16)

    def update_bytes(self) -> int:
        """Read shadow + write shadow + read param: 12 B/param fp32, 10 B/param bf16 -> fp32."""
        return sum(
            (2 * (4 if self.mixed else p.element_size()) + p.element_size()) * p.numel() for p in self.params
        )


class Skip(Exception):
    """This method cannot run here; the message says why."""


@dataclass
class Method:
    update: Callable[[], Any]  # one EMA update
    state: list = field(default_factory=list)  # the persistent tensors it allocated
    inner_only: Optional[Callable[[], Any]] = None  # for ema_optim.step: the inner step alone
    note: str = ""


def without_grads(fn: Callable[[], Any], params: list[Tensor]) -> Callable[[], Any]:
    """``fn`` run with every param's grad hidden, so that an inner SGD step does nothing."""

    def call():
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            return fn()
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    return call


def shadow_tensors(opt: Any) -> list[Tensor]:
    """Every shadow an EMAOptimizer keeps: the state entries ``ema``, ``ema_1``, ``ema_2``, ..."""
    return [
        v
        for s in opt.state.values()
        for k, v in s.items()
        if isinstance(v, Tensor) and (k == "ema" or str(k).startswith("ema_"))
    ]


def ema_optim_step(case: Case, **kwargs: Any) -> Method:
    """The whole wrapper step around an inner step that does nothing (SGD, grads hidden)."""
    from ema_optim import EMAOptimizer

    params = case.params
    inner = torch.optim.SGD(params, lr=0.0)
    opt = EMAOptimizer(inner, decay=kwargs.pop("decay", DECAY), **kwargs)
    step = without_grads(opt.step, params)
    step()  # creates the shadows
    return Method(step, shadow_tensors(opt), without_grads(inner.step, params), "step - inner step")


# ------------------------------------------------------------------------------ peers


def quarantine_torchvision() -> None:
    """Several peers import torchvision when it is installed. PyPI's torchvision wheel is a
    CUDA build whose C ops do not load into a CPU-only torch; treat it as absent then."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure: the package is unusable
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        IMPORT_NOTES["torchvision"] = f"torchvision does not load ({type(e).__name__}: {str(e)[:80]})"


def _load_by_path(module: str) -> Any:
    """``timm.utils.model_ema`` alone: ``import timm`` pulls in torchvision, this file needs torch only."""
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None or spec.origin is None:
        raise ImportError(module)
    path = pathlib.Path(spec.origin).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    mod_spec = importlib.util.spec_from_file_location("_bench_" + module.replace(".", "_"), path)
    loaded = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(loaded)  # type: ignore[union-attr]
    return loaded


def _import(module: str, attr: str) -> tuple[Any, str]:
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception as first:  # noqa: BLE001
        if module.startswith("timm."):
            try:
                return getattr(_load_by_path(module), attr), f"{module} loaded alone (`import timm` failed)"
            except Exception:  # noqa: BLE001
                pass
        raise Skip(f"cannot import {module}.{attr}: {type(first).__name__}: {str(first)[:100]}") from first


Built = tuple[Callable[[], Any], list, str]  # (update, persistent tensors, note)


def _swa(cls: Any, case: Case) -> Built:
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    avg = cls(case.model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=False)
    if case.mixed:
        avg.module.float()
    avg.update_parameters(case.model)  # the first call copies
    return (lambda: avg.update_parameters(case.model)), list(avg.state_dict().values()), ""


def _timm_v2(cls: Any, case: Case) -> Built:
    ema = cls(case.model, decay=DECAY)
    if case.mixed:
        ema.module.float()
    return (lambda: ema.update(case.model)), list(ema.module.state_dict().values()), "per-tensor loop"


def _timm_v3(cls: Any, case: Case) -> Built:
    ema = cls(case.model, decay=DECAY, dtype=torch.float32 if case.mixed else None, foreach=True)
    return (lambda: ema.update(case.model)), list(ema.module.state_dict().values()), "foreach=True"


def _ema_pytorch(cls: Any, case: Case) -> Built:
    kwargs: dict[str, Any] = {}
    if case.mixed:  # fp32 EMA model, online weights cast on every update
        kwargs = dict(ema_model=copy.deepcopy(case.model).float(), coerce_dtype=True)
    ema = cls(case.model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=True, **kwargs)
    ema.update()  # the first update copies
    state = list(ema.ema_model.state_dict().values()) + [ema.initted, ema.step]
    return ema.update, state, "use_foreach=True" + (", coerce_dtype=True" if case.mixed else "")


def _torch_ema(cls: Any, case: Case) -> Built:
    params = case.params
    ema = cls(params, decay=DECAY, use_num_updates=False)
    if case.mixed:
        ema.to(dtype=torch.float32)
    return (lambda: ema.update(params)), list(ema.shadow_params), ""


def _diffusers(cls: Any, case: Case) -> Built:
    params = case.params
    ema = cls(params, decay=DECAY, foreach=True, use_ema_warmup=False)
    if case.mixed:
        ema.to(dtype=torch.float32)
    return (lambda: ema.step(params)), list(ema.shadow_params), "foreach=True"


def _loop(_: Any, case: Case) -> Built:
    params = [p.detach() for p in case.params]
    shadows = [p.float() if case.mixed else p.clone() for p in params]

    @torch.no_grad()
    def update():
        for e, p in zip(shadows, params):
            e.lerp_(p if p.dtype == e.dtype else p.to(e.dtype), WEIGHT)

    return update, shadows, "lerp_(p.to(fp32)) per tensor" if case.mixed else ""


def _foreach(_: Any, case: Case) -> Built:
    if case.mixed:
        raise Skip("_foreach_lerp_ needs one dtype per pair")
    params = [p.detach() for p in case.params]
    shadows = [p.clone() for p in params]
    return (lambda: torch._foreach_lerp_(shadows, params, WEIGHT)), shadows, "the bare kernel"


@dataclass(frozen=True)
class Peer:
    module: str  # where the class lives ("" for the hand-written references)
    attr: str
    make: Callable[[Any, Case], Built]


PEERS: dict[str, Peer] = {
    "swa_utils": Peer("torch.optim.swa_utils", "AveragedModel", _swa),
    "timm.ModelEmaV2": Peer("timm.utils.model_ema", "ModelEmaV2", _timm_v2),
    "timm.ModelEmaV3": Peer("timm.utils.model_ema", "ModelEmaV3", _timm_v3),
    "ema_pytorch": Peer("ema_pytorch", "EMA", _ema_pytorch),
    "torch_ema": Peer("torch_ema", "ExponentialMovingAverage", _torch_ema),
    "diffusers": Peer("diffusers.training_utils", "EMAModel", _diffusers),
    "loop lerp_": Peer("", "", _loop),
    "foreach lerp_": Peer("", "", _foreach),
}
REFERENCES = ("loop lerp_", "foreach lerp_")  # hand-written, not libraries


def peer_method(peer: Peer, case: Case) -> Method:
    """The skeleton every peer goes through: import, build, one update that must work."""
    cls, note = _import(peer.module, peer.attr) if peer.module else (None, "")
    update, state, own_note = peer.make(cls, case)
    update()
    return Method(update, state, note="; ".join(n for n in (own_note, note) if n))


def build(make: Callable[[], Method], device: torch.device) -> tuple[Optional[Method], str, Optional[int]]:
    """Build a method; returns (method or None, skip reason, CUDA peak bytes of building it)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method = make()
    except Exception as e:  # noqa: BLE001 - a peer's own failure is a skip, not a crash
        return None, str(e) if isinstance(e, Skip) else f"{type(e).__name__}: {str(e)[:120]}", None
    if device.type != "cuda":
        return method, "", None
    torch.cuda.synchronize(device)
    return method, "", torch.cuda.max_memory_allocated(device) - base
