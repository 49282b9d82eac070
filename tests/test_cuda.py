"""The CUDA paths: the offload pipeline, sync-free steps (GradScaler with fused AdamW), the
compiled step and the swap, on a GPU.

Every CUDA case carries the ``cuda`` marker (``pytest -m cuda`` selects exactly them) and is
skipped without a GPU. Where a test body means something on CPU too it also runs there (ids
with ``cpu``), so that the test code itself runs on CPU-only machines. On CPU the offload
cases force the pipeline onto CPU tensors with the hook tests/test_offload.py uses; the CUDA
cases use the public API only.

Results are compared bit for bit, or with the float64 reference of SPEC's formula
(tests/reference.py), never with the code's own output. The "on-device" runs that the
offloaded shadows are compared with average the same weights through :class:`Follow`, so no
comparison relies on training being deterministic.

Host syncs are caught with ``torch.cuda.set_sync_debug_mode("error")``: it raises on
``.item()``, blocking copies between host and device and stream or device synchronisation
(c10/cuda/CUDAFunctions.h), not on ``cudaEventSynchronize``, which the offload's background
fold thread uses by design. ``GradScaler.update()`` has no host read in torch 2.13 (it only
launches ``_amp_update_scale_``), but only ``scaler.step(opt)`` / ``opt.step()`` is checked
here: that is the wrapper's part.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ema_optim import EMAOptimizer, _kernels, schedules

from .reference import reference_shadows

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)"
)
ON_CUDA = [pytest.mark.cuda, needs_cuda]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=ON_CUDA, id="cuda")]
RTOL, ATOL = 1e-5, 1e-6  # fp32 shadows against the float64 reference after a few updates


def cuda_only(test):
    return pytest.mark.cuda(needs_cuda(test))


def placements():
    """(device, dtype, ema_device) for fp32, bf16 and fp16 params: CPU params with their shadows,
    CUDA params with on-device and with offloaded shadows (CPU shadows of CPU params are not
    offloaded)."""
    return [
        pytest.param(device, dtype, ema_device, marks=marks, id=f"{device}-{str(dtype)[6:]}-{label}")
        for device, marks in (("cpu", []), ("cuda", ON_CUDA))
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        for ema_device, label in ((None, "on-device"), ("cpu", "offloaded"))
        if not (device == "cpu" and ema_device == "cpu")
    ]


# ---------------------------------------------------------------------------------- helpers


def bits(t):
    t = t.detach().cpu().contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(actual, expected, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a.dtype, a.shape) == (e.dtype, e.shape), (
            f"{what} {i}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        )
        differ = bits(a) != bits(e)
        if differ.any():
            gap = (a.detach().cpu().double() - e.detach().cpu().double()).abs().max().item()
            pytest.fail(
                f"{what} {i}: {int(differ.sum())} of {a.numel()} elements differ in their bits "
                f"(max |difference| {gap:.3g})"
            )


def weights64(params):
    return [p.detach().double().cpu() for p in params]


def shadows(opt):
    """The shadows in param order, from state_dict() (which waits for an offloaded update)."""
    sd = opt.state_dict()
    count = sum(len(g["params"]) for g in sd["param_groups"])
    return [sd["state"][i]["ema"] for i in range(count)]


def assert_follows_reference(got, initial, history, kwargs):
    for i, s in enumerate(got):
        ref = reference_shadows(initial[i], [h[i] for h in history], **kwargs)[-1]
        torch.testing.assert_close(
            s.double().cpu(), ref, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"shadow {i}: {m}"
        )


def as_param_dtype(shadow, dtype):
    """What the swap puts into a param: the shadow in the param's dtype. bf16: to nearest,
    ties away from zero (swap_ema_weights' docstring); fp16: ``.half()``; same dtype: itself."""
    shadow = shadow.detach().cpu()
    if dtype == shadow.dtype:
        return shadow
    if dtype == torch.float16:
        return shadow.half()
    assert dtype == torch.bfloat16 and shadow.dtype == torch.float32
    x = shadow.double()
    toward_zero = shadow.view(torch.int32) & ~0xFFFF  # the bf16 neighbour of smaller magnitude
    lo = toward_zero.view(torch.float32).double()
    hi = (toward_zero + 0x10000).view(torch.float32).double()  # and of larger magnitude
    nearer = torch.where((x - lo).abs() < (hi - x).abs(), lo, hi)  # a tie goes to hi
    return nearer.to(torch.bfloat16)


def assert_swap_exact(opt, params):
    """Inside the block each param holds its shadow in its own dtype; afterwards params and
    shadows are back bit for bit."""
    params = list(params)  # in the optimizer's order
    held = [s.clone() for s in shadows(opt)]
    before = [p.detach().clone() for p in params]
    with opt.swap_ema_weights():
        inside = [p.detach().clone() for p in params]
    assert_bitwise(
        inside, [as_param_dtype(s, p.dtype) for s, p in zip(held, params)], "param inside the swap"
    )
    assert any(not torch.equal(bits(a), bits(b)) for a, b in zip(inside, before)), (
        "the EMA equals the weights"
    )
    assert_bitwise(params, before, "param after the swap")
    assert_bitwise(shadows(opt), held, "shadow after the swap")


def assert_state_dict_same_inside_swap(opt):
    outside = opt.state_dict()
    expected = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in outside["state"].items()
    }
    with opt.swap_ema_weights():
        inside = opt.state_dict()
    assert inside["param_groups"] == outside["param_groups"]
    assert inside["state"].keys() == expected.keys()
    for i, s in expected.items():
        assert inside["state"][i].keys() == s.keys()
        tensors = [k for k, v in s.items() if torch.is_tensor(v)]
        assert_bitwise(
            [inside["state"][i][k] for k in tensors], [s[k] for k in tensors], f"state[{i}] inside the swap"
        )
        assert all(inside["state"][i][k] == v for k, v in s.items() if k not in tensors)


@contextlib.contextmanager
def no_host_sync(device):
    """On CUDA, any host-device synchronisation inside the block raises RuntimeError."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def offload_forced(device):
    """CPU runs only: send CPU shadows through the offload pipeline (staging copy, background
    fold), which they would otherwise skip. On CUDA the shadows on the host take it anyway."""
    if device != "cpu":
        yield
        return
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)
        yield


class Follow(torch.optim.Optimizer):
    """An inner optimizer whose step copies another model's current weights into its params.

    An EMAOptimizer around it, stepped right after the optimizer under test, averages exactly
    the weights the model under test had after each step, with its own shadows and kernels.
    """

    def __init__(self, params, sources):
        super().__init__(params, {})
        self.sources = list(sources)

    @torch.no_grad()
    def step(self, closure=None):
        for p, source in zip(self.param_groups[0]["params"], self.sources):
            p.copy_(source)


class Net(nn.Module):
    """A channels_last conv, a LayerNorm and two linears: 0.53M params (2 MB in fp32)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 8 * 8, 256)
        self.norm = nn.LayerNorm(256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(self.norm(F.gelu(self.fc1(h))))


def make_net(device, dtype, seed=0):
    torch.manual_seed(seed)
    return Net().to(device=device, dtype=dtype, memory_format=torch.channels_last)


def train_step(model, opt, i, force=False):
    p = next(model.parameters())
    x = torch.randn(16, 8, 8, 8, generator=torch.Generator().manual_seed(1000 + i))
    x = x.to(p.device, p.dtype).contiguous(memory_format=torch.channels_last)
    model(x).float().pow(2).mean().backward()
    with offload_forced(p.device.type if force else None):
        opt.step()
    opt.zero_grad()


def offloaded_and_follower(model, kwargs, lr=0.02):
    """The optimizer under test (AdamW, shadows offloaded to the host) and an EMAOptimizer
    with on-device shadows over a copy of the model that follows its weights."""
    follower = copy.deepcopy(model)
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), ema_device="cpu", **kwargs)
    ref = EMAOptimizer(Follow(follower.parameters(), model.parameters()), **kwargs)
    return opt, ref, follower


def assert_on_pinned_host(opt, params):
    for p in params:
        s = opt.state[p]["ema"]
        assert s.device.type == "cpu"
        if p.device.type == "cuda":
            assert s.is_pinned(), "offloaded shadows of CUDA params must be pinned host memory"


# ------------------------------------------------------------------------ 1. offload pipeline

PIPELINE = {
    "fp32-warmup-bias": (torch.float32, dict(decay=schedules.warmup(0.95), bias_correction=True)),
    "fp32-after2-every2": (torch.float32, dict(decay=0.8, update_after_step=2, update_every=2)),
    "bf16-cosine": (torch.bfloat16, dict(decay=schedules.cosine(0.5, 0.9, 5))),
}
STEPS = 8


@pytest.mark.parametrize("name", PIPELINE)
@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_shadows_equal_on_device_shadows_bitwise(device, name):
    dtype, kwargs = PIPELINE[name]
    model = make_net(device, dtype)
    opt, ref, _ = offloaded_and_follower(model, kwargs)
    params = list(model.parameters())
    initial, history = weights64(params), []
    for i in range(STEPS):
        train_step(model, opt, i, force=True)
        ref.step()
        history.append(weights64(params))

    got, expected = shadows(opt), shadows(ref)
    assert all(e.device == p.device for e, p in zip(expected, params))
    assert all(s.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype) for s in got)
    assert_on_pinned_host(opt, params)
    assert_bitwise(got, expected, "offloaded vs on-device shadow")
    assert_follows_reference(got, initial, history, kwargs)

    assert_state_dict_same_inside_swap(opt)
    assert_swap_exact(opt, params)
    train_step(model, opt, STEPS, force=True)  # the pipeline goes on after a swap
    ref.step()
    assert_bitwise(shadows(opt), shadows(ref), "shadow one step after the swap")


@pytest.mark.parametrize("name", PIPELINE)
@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_resume_is_exact(device, name):
    # the resumed steps repeat the same forward and backward: no nondeterministic cuDNN algorithms
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        _resume_is_exact(device, *PIPELINE[name])


def _resume_is_exact(device, dtype, kwargs):
    def build(seed):
        model = make_net(device, dtype, seed)
        opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.02), ema_device="cpu", **kwargs)
        return model, opt

    model, opt = build(0)
    for i in range(STEPS // 2):
        train_step(model, opt, i, force=True)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    for i in range(STEPS // 2, STEPS):
        train_step(model, opt, i, force=True)
    straight = [p.detach().clone() for p in model.parameters()], [s.clone() for s in shadows(opt)]

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    model2, opt2 = build(1)  # other initial weights: only the checkpoint makes them equal
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    assert_on_pinned_host(opt2, model2.parameters())
    for i in range(STEPS // 2, STEPS):
        train_step(model2, opt2, i, force=True)
    assert_bitwise(list(model2.parameters()), straight[0], "resumed weight")
    assert_bitwise(shadows(opt2), straight[1], "resumed shadow")
    assert_on_pinned_host(opt2, model2.parameters())


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_offload_pipeline_on_a_50m_param_model(dtype):
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(2048, 2048), nn.GELU()]
    model = nn.Sequential(*layers).to("cuda", dtype)  # 50.4M params, 4.2M per weight: several chunks
    kwargs = dict(decay=schedules.warmup(0.99), update_every=2)
    opt, ref, _ = offloaded_and_follower(model, kwargs, lr=1e-3)
    params = list(model.parameters())
    watched = params[:2]  # first weight and bias: against the float64 reference
    initial, history = weights64(watched), []
    g = torch.Generator().manual_seed(5)
    for _ in range(8):
        model(torch.randn(32, 2048, generator=g).to("cuda", dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ref.step()
        history.append(weights64(watched))
    got = shadows(opt)
    assert_on_pinned_host(opt, params)
    assert_bitwise(got, shadows(ref), "offloaded vs on-device shadow")
    assert_follows_reference(got[:2], initial, history, kwargs)
    assert_swap_exact(opt, params)


# --------------------------------------------------------------------- 2. no host sync, GradScaler


@cuda_only
def test_sync_debug_mode_catches_a_host_read():
    t = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"):
        with no_host_sync("cuda"):
            t.sum().item()
    t.sum().item()  # and the mode is off again


INF_AT = 2


@pytest.mark.parametrize("device, dtype, ema_device", placements())
def test_grad_scaler_inf_step_with_fused_adamw_changes_nothing_and_does_not_sync(device, dtype, ema_device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 8)).to(device, dtype)
    params = list(model.parameters())
    opt = EMAOptimizer(torch.optim.AdamW(params, lr=1e-2, fused=True), decay=0.8, ema_device=ema_device)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    initial, history = weights64(params), []
    g = torch.Generator().manual_seed(3)
    for i in range(6):
        x = torch.randn(32, 64, generator=g).to(device, dtype)
        scaler.scale(model(x).float().pow(2).mean()).backward()
        if i == INF_AT:
            params[0].grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in params], [s.clone() for s in shadows(opt)]
        # the first step makes the inner state and the shadows; every later one must not sync
        with no_host_sync(device) if i > 0 else contextlib.nullcontext():
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == INF_AT:
            assert scaler.get_scale() == 2.0**9, "the scaler did not see the inf gradient"
            assert_bitwise(params, before[0], "weight after the inf step")
            assert_bitwise(shadows(opt), before[1], "shadow after the inf step")
        else:
            history.append(weights64(params))
    # constant decay: the skipped step (weight zero) is as if it never happened
    assert_follows_reference(shadows(opt), initial, history, dict(decay=0.8))


# learning rates large enough that a missed or doubled EMA update is far outside the tolerance
SYNC_INNERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "adamw-capturable": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True, capturable=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
}
SYNC_DECAYS = {
    "constant": dict(decay=0.99),
    "warmup": dict(decay=schedules.warmup()),
    "polyak-bias-after1-every2": dict(
        decay=schedules.polyak(), bias_correction=True, update_after_step=1, update_every=2
    ),
}


@cuda_only
@pytest.mark.parametrize("ema_device", [None, "cpu"], ids=["on-device", "offloaded"])
@pytest.mark.parametrize("decay", SYNC_DECAYS)
@pytest.mark.parametrize("inner", SYNC_INNERS)
@pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True")
def test_plain_step_does_not_sync(inner, decay, ema_device):
    # fp32, and bf16 with fp32 shadows (cast in batches, and in pieces for a param over one chunk)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [((256, 256), torch.float32), ((256,), torch.float32), ((64, 64), torch.bfloat16)]
    shapes.append(((2, 1_100_000), torch.bfloat16))
    params = [nn.Parameter(torch.randn(s, generator=g, device="cuda").to(d)) for s, d in shapes]
    kwargs = SYNC_DECAYS[decay]
    opt = EMAOptimizer(SYNC_INNERS[inner](params), ema_device=ema_device, **kwargs)
    grads = [[torch.randn_like(p, dtype=torch.float32).to(p.dtype) for p in params] for _ in range(7)]
    initial, history = weights64(params), []
    for i, step_grads in enumerate(grads):
        for p, grad in zip(params, step_grads):
            p.grad = grad
        with no_host_sync("cuda") if i >= 2 else contextlib.nullcontext():  # after two warm-up steps
            opt.step()
        history.append(weights64(params))
    assert_follows_reference(shadows(opt), initial, history, kwargs)


# ----------------------------------------------------------------------- 3. compiled step

COMPILE_STEPS, SETTLED = 20, 3  # frames may still be added during the first steps
COMPILE_CASES = [
    pytest.param("cpu", None, "aot_eager", id="cpu-aot_eager"),
    pytest.param("cuda", None, "inductor", marks=ON_CUDA, id="cuda-inductor"),
    pytest.param("cuda", "cpu", "inductor", marks=ON_CUDA, id="cuda-inductor-offloaded"),
]
COMPILE_KWARGS = dict(decay=schedules.warmup(0.99), bias_correction=True)


def _compile_run(device, ema_device, backend=None):
    """20 steps of AdamW with a scheduled decay; ``backend=None``: eager. Returns the params,
    the optimizer, the weights before and after each step, and the frames compiled so far."""
    from torch import _dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    _dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)
    params = list(model.parameters())
    opt = EMAOptimizer(torch.optim.AdamW(params, lr=1e-2), ema_device=ema_device, **COMPILE_KWARGS)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(128, 32, generator=g).to(device), torch.randn(128, 1, generator=g).to(device)
    counter = CompileCounterWithBackend(backend) if backend else None
    step = torch.compile(opt.step, backend=counter) if counter else opt.step
    initial, history, seen = weights64(params), [], []
    # raised limits: a recompile per step would show as a growing count, not an eager fallback
    with _dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        for _ in range(COMPILE_STEPS):
            F.mse_loss(model(x), y).backward()
            step()
            opt.zero_grad()
            history.append(weights64(params))
            seen.append(counter.frame_count if counter else 0)
    _dynamo.reset()
    return params, opt, initial, history, seen


@pytest.mark.parametrize("device, ema_device, backend", COMPILE_CASES)
def test_compiled_step_does_not_recompile_and_matches_eager(device, ema_device, backend):
    params, opt, initial, history, seen = _compile_run(device, ema_device, backend)
    assert seen[-1] > 0, "nothing was compiled"
    assert seen[SETTLED:] == [seen[SETTLED]] * (COMPILE_STEPS - SETTLED), f"compiles kept growing: {seen}"
    got = shadows(opt)
    assert_follows_reference(got, initial, history, COMPILE_KWARGS)
    assert not torch.equal(got[0].cpu(), params[0].detach().cpu()), "the EMA equals the weights"

    eager_params, eager_opt, *_ = _compile_run(device, ema_device)
    # compiled and eager AdamW (capturable under compile on CUDA) differ by a few roundings
    for a, b in zip(params + got, eager_params + shadows(eager_opt)):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- 4. swap


@pytest.mark.parametrize("device, dtype, ema_device", placements())
def test_swap_is_exact(device, dtype, ema_device):
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Conv2d(32, 64, 3), nn.Linear(512, 1024), nn.Linear(1024, 1100, bias=False)])
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)  # 1.7M params
    params = list(model.parameters())
    assert params[0].is_contiguous(memory_format=torch.channels_last) and not params[0].is_contiguous()
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.1), decay=0.7, ema_device=ema_device)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p in params:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # the param's layout
        opt.step()
    held = shadows(opt)
    assert all(s.dtype == torch.float32 for s in held) and all(
        s.device.type == (ema_device or device) for s in held
    )
    assert_swap_exact(opt, params)


# ---------------------------------------------------------------------- 5. several devices


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("ema_device", [None, "cpu"], ids=["on-device", "offloaded"])
def test_params_on_two_devices(ema_device):
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(64, 64).to("cuda:0"), nn.Linear(64, 64).to("cuda:1", torch.bfloat16)])
    params = list(model.parameters())
    kwargs = dict(decay=schedules.warmup(0.9))
    follower = copy.deepcopy(model)
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), ema_device=ema_device, **kwargs)
    ref = EMAOptimizer(Follow(follower.parameters(), params), **kwargs)
    g = torch.Generator().manual_seed(6)
    initial, history = weights64(params), []
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        opt.step()
        ref.step()
        history.append(weights64(params))
    got = shadows(opt)
    for s, p in zip(got, params):
        assert s.device == (torch.device("cpu") if ema_device else p.device)
    if ema_device:
        assert_on_pinned_host(opt, params)
    assert_bitwise(got, shadows(ref), "shadow vs on-device shadow")
    assert_follows_reference(got, initial, history, kwargs)
    assert_swap_exact(opt, params)
