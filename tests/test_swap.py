"""swap_ema_weights(): the EMA goes in, the training weights come back bit for bit."""

from __future__ import annotations

import pytest
import torch

from ema_optim import EMAOptimizer, _kernels, _swap

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def trained(dtype, steps=3, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).to(dtype)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.7, **kwargs)
    for _ in range(steps):
        model(torch.randn(4, 5, dtype=dtype)).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def bits(t):
    return t.detach().clone(memory_format=torch.contiguous_format).view(torch.uint8)


def snapshot(model, opt):
    return [bits(p) for p in model.parameters()], [bits(opt.state[p]["ema"]) for p in model.parameters()]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swap_puts_ema_in_and_restores_bitwise(dtype):
    model, opt = trained(dtype)
    before = snapshot(model, opt)
    shadows = [opt.state[p]["ema"].clone() for p in model.parameters()]
    with opt.swap_ema_weights():
        for p, s in zip(model.parameters(), shadows):
            # the EMA rounded to the param dtype (bf16: to nearest, ties away from zero)
            assert torch.allclose(p.detach().double(), s.double(), rtol=2**-8, atol=0)
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    assert_same(snapshot(model, opt)[0], before[0])
    assert_same(snapshot(model, opt)[1], before[1])
    for v, s in zip(inside.values(), shadows):
        torch.testing.assert_close(v.double(), s.double(), rtol=2**-8, atol=0)


def test_same_dtype_swap_gives_the_exact_shadow():
    model, opt = trained(torch.float32)
    shadows = [opt.state[p]["ema"].clone() for p in model.parameters()]
    with opt.swap_ema_weights():
        for p, s in zip(model.parameters(), shadows):
            assert torch.equal(p.detach(), s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restores_on_exception(dtype):
    model, opt = trained(dtype)
    before = snapshot(model, opt)
    with pytest.raises(KeyError, match="boom"):
        with opt.swap_ema_weights():
            raise KeyError("boom")
    assert_same(snapshot(model, opt)[0], before[0])
    assert_same(snapshot(model, opt)[1], before[1])


def test_step_and_nested_swap_raise_and_change_nothing():
    model, opt = trained(torch.float32)
    with opt.swap_ema_weights():
        inside = snapshot(model, opt)
        model(torch.randn(2, 5)).sum().backward()
        with pytest.raises(RuntimeError, match="inside swap_ema_weights"):
            opt.step()
        with pytest.raises(RuntimeError, match="nested"):
            with opt.swap_ema_weights():
                pass
        with pytest.raises(RuntimeError, match="swap_ema_weights"):
            opt.load_state_dict(opt.state_dict())
        assert_same(snapshot(model, opt)[0], inside[0])
        assert_same(snapshot(model, opt)[1], inside[1])
    opt.step()  # works again outside


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_state_dict_inside_equals_outside(dtype):
    model, opt = trained(dtype)
    outside = opt.state_dict()
    expected = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in outside["state"].items()
    }
    with opt.swap_ema_weights():
        inside = opt.state_dict()
        params_inside = snapshot(model, opt)[0]
    assert inside["param_groups"] == outside["param_groups"]
    for i, s in expected.items():
        assert inside["state"][i].keys() == s.keys()
        for k, v in s.items():
            assert torch.equal(inside["state"][i][k], v) if torch.is_tensor(v) else inside["state"][i][k] == v
    with opt.swap_ema_weights():  # and the swap inside was not disturbed by state_dict()
        assert_same(snapshot(model, opt)[0], params_inside)


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_a_param_given_a_new_shape_is_refused_clearly_and_changes_nothing(j):
    """Head surgery (p.data = ... with a new shape) on any param of a group, not only the first:
    the ValueError that says what changed and what to do, and nothing changed; so does the next step."""
    model, opt = trained(torch.float32)
    with opt.swap_ema_weights():  # the layout is cached before the change
        pass
    p = list(model.parameters())[j]
    p.data = torch.randn(5, *p.shape[1:])
    before = snapshot(model, opt)
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"param {j} of param group 0 \(shape \(5.*Load a state dict"):
            with opt.swap_ema_weights():
                pass  # pragma: no cover
        assert_same(snapshot(model, opt)[0], before[0])
        assert_same(snapshot(model, opt)[1], before[1])
    for q in model.parameters():
        q.grad = torch.ones_like(q)
    with pytest.raises(ValueError, match=rf"param {j} of param group 0"):
        opt.step()  # refused before the inner step: nothing moved
    assert_same(snapshot(model, opt)[0], before[0])


def test_swap_before_first_step_is_a_noop():
    model = torch.nn.Linear(3, 2)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [bits(p) for p in model.parameters()]
    with opt.swap_ema_weights():
        assert_same([bits(p) for p in model.parameters()], before)
    assert_same([bits(p) for p in model.parameters()], before)


def test_non_contiguous_param_uses_a_copy_and_restores():
    base = torch.randn(6, 4)
    p = torch.nn.Parameter(base.t())  # non-contiguous leaf
    assert not p.is_contiguous()
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), decay=0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    before, shadow = bits(p), opt.state[p]["ema"].clone()
    with opt.swap_ema_weights():
        assert torch.equal(p.detach(), shadow)
    assert torch.equal(bits(p), before)


def _random_bits(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    width = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    info = torch.iinfo(width)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(width).view(dtype)


def test_pack_unpack_is_the_identity_on_every_bit_pattern():
    # random bit patterns (NaNs, infs, subnormals, -0 included) plus the rounding edge cases
    shadow = _random_bits(200_000, torch.float32, 1)
    param = _random_bits(200_000, torch.bfloat16, 2)
    edges = torch.tensor(
        [0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x00008000, 0x80008000, 0],
        dtype=torch.int64,
    )
    edges = torch.where(edges >= 2**31, edges - 2**32, edges).to(torch.int32).view(torch.float32)
    shadow = torch.cat([shadow, edges])
    param = torch.cat([param, param[: len(edges)]])
    s, p = shadow.clone(), param.clone()
    _swap.pack_(s, p)
    _swap.unpack_(s, p)
    assert torch.equal(s.view(torch.int32), shadow.view(torch.int32))
    assert torch.equal(p.view(torch.int16), param.view(torch.int16))


def test_pack_rounds_to_nearest_bf16():
    g = torch.Generator().manual_seed(3)
    shadow = torch.randn(100_000, generator=g) * torch.logspace(-30, 30, 100_000).float()
    s, p = shadow.clone(), torch.zeros(100_000, dtype=torch.bfloat16)
    _swap.pack_(s, p)
    # reference in float64: the two bf16 neighbours of the value, take the nearer one
    x = shadow.double()
    down = shadow.view(torch.int32) & ~0xFFFF  # truncation toward zero (sign-magnitude)
    lo = down.view(torch.float32).double()
    hi = (down + 0x10000).view(torch.float32).double()
    nearer = torch.where((x - lo).abs() < (hi - x).abs(), lo, hi)
    ties = (x - lo).abs() == (hi - x).abs()
    assert torch.equal(p.double()[~ties], nearer[~ties])
    assert torch.equal(p.double()[ties], hi[ties])  # ties away from zero
    # differs from round-to-nearest-even only on exact ties
    assert torch.equal(p[~ties], shadow.to(torch.bfloat16)[~ties])


class ReadForwardingProxy:
    """Like Lightning's LightningOptimizer: a subclass of the optimizer's class that forwards
    attribute reads to the optimizer it wraps and keeps writes to itself."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Proxy" + type(optimizer).__name__, (type(self), type(optimizer)), {})

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


def test_swap_load_and_add_group_through_a_proxy_reach_the_real_optimizer():
    model, opt = trained(torch.float32)
    proxy = ReadForwardingProxy(opt)
    sd = opt.state_dict()
    shadow = sd["state"][0]["ema"].clone()
    with proxy.swap_ema_weights():
        with pytest.raises(RuntimeError, match="inside swap_ema_weights"):
            opt.step()
        assert torch.equal(proxy.state_dict()["state"][0]["ema"], shadow)
    proxy.load_state_dict(sd)
    assert opt._rt.counters.steps == sd["param_groups"][0]["ema_steps"] and "_steps" not in vars(proxy)
    extra = torch.nn.Parameter(torch.ones(2))
    proxy.add_param_group({"params": [extra]})
    extra.grad = torch.ones(2)
    opt.step()
    assert "ema" in opt.state[extra]


def test_channels_last_params_swap_in_place_and_step_allocates_nothing():
    from .test_memory import AllocationSpy

    conv = torch.nn.Conv2d(64, 64, 3).to(torch.bfloat16).to(memory_format=torch.channels_last)
    opt = EMAOptimizer(torch.optim.SGD(conv.parameters(), lr=0.1), decay=0.9)
    for p in conv.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    w = conv.weight
    assert opt.state[w]["ema"].stride() == w.stride()  # the shadow keeps the param's layout
    spy = AllocationSpy()
    with spy:
        opt.step()
    assert spy.bytes < 0.01 * w.numel() * 2
    before, shadow = bits(w), opt.state[w]["ema"].clone()
    with opt.swap_ema_weights():
        assert [r.method for r in opt._rt.swapped] == ["pack", "pack"]
        torch.testing.assert_close(w.detach().float(), shadow, rtol=2**-8, atol=0)
    assert torch.equal(bits(w), before) and torch.equal(opt.state[w]["ema"], shadow)


def test_a_nan_ema_shows_as_nan_inside_the_swap():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = EMAOptimizer(torch.optim.SGD([w], lr=0.1), decay=0.5)
    w.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    nan_bits = torch.tensor([0x7F807FFF, -1, 0x7FC00000, 0x3F808000], dtype=torch.int64)
    nan_bits = torch.where(nan_bits >= 2**31, nan_bits - 2**32, nan_bits).to(torch.int32)
    opt.state[w]["ema"].copy_(nan_bits.view(torch.float32))
    before, shadow = bits(w), opt.state[w]["ema"].clone()
    with opt.swap_ema_weights():
        assert torch.isnan(w.detach()[:3]).all()
    assert torch.equal(bits(w), before)
    assert torch.equal(shadow.view(torch.int32), opt.state[w]["ema"].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_failure_between_pieces_of_a_large_tensor_restores_everything(dtype, monkeypatch):
    monkeypatch.setattr(_kernels, "CHUNK", 64)  # a 1,000-element param is 16 pieces
    params = [torch.nn.Parameter(torch.randn(1000).to(dtype)) for _ in range(3)]
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.1), decay=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [bits(p) for p in params]
    shadows = [bits(opt.state[p]["ema"]) for p in params]
    method = {torch.float32: "exchange", torch.bfloat16: "pack", torch.float16: "pack16"}[dtype]
    (real, inverse), calls = _swap.SWAP_KERNELS[method], []

    def flaky(s, p):
        calls.append(1)
        if len(calls) == 21:  # in the middle of the second param
            raise KeyboardInterrupt
        real(s, p)

    monkeypatch.setitem(_swap.SWAP_KERNELS, method, (flaky, inverse))
    with pytest.raises(KeyboardInterrupt):
        with opt.swap_ema_weights():
            pass
    assert all(torch.equal(a, bits(p)) for a, p in zip(before, params))
    assert all(torch.equal(a, bits(opt.state[p]["ema"])) for a, p in zip(shadows, params))
    assert opt._rt.swapped is None


def test_pack16_is_exact_and_rounds_like_torch():
    g = torch.Generator().manual_seed(5)
    mags = torch.logspace(-4.2, 4.5, 200_000).float()  # fp16's normal range is [6.1e-5, 65504]
    shadow = torch.randn(200_000, generator=g).sign() * mags * (1 + torch.rand(200_000, generator=g))
    shadow[:3] = torch.tensor([0.0, -0.0, 65504.0])
    assert all(_swap.packable([(shadow, torch.empty(0, dtype=torch.float16), "pack16")]))
    param = torch.randn(200_000, generator=g).half()
    s, p = shadow.clone(), param.clone()
    for s_piece, p_piece in _swap.swap_pieces(s, p):
        _swap.pack16_(s_piece, p_piece)
    assert torch.equal(p.view(torch.int16), shadow.half().view(torch.int16))  # torch's own rounding
    for s_piece, p_piece in _swap.swap_pieces(s, p):
        _swap.unpack16_(s_piece, p_piece)
    assert torch.equal(s.view(torch.int32), shadow.view(torch.int32))
    assert torch.equal(p.view(torch.int16), param.view(torch.int16))


@pytest.mark.parametrize("value", [1e-6, 1e5, float("inf"), float("nan")])
def test_fp16_ema_outside_fp16_range_falls_back_to_a_copy(value):
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = EMAOptimizer(torch.optim.SGD([w], lr=0.1), decay=0.5)
    w.grad = torch.ones(4, dtype=torch.float16)
    opt.step()
    opt.state[w]["ema"][1] = value
    before, shadow = bits(w), opt.state[w]["ema"].clone()
    with opt.swap_ema_weights():
        assert [r.method for r in opt._rt.swapped] == ["copy"]
        torch.testing.assert_close(w.detach(), shadow.half(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(bits(w), before) and torch.equal(bits(opt.state[w]["ema"]), bits(shadow))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_float64_shadows_swap_in_place_bit_for_bit(dtype):
    """SPEC: no full-model copy, also for float64 shadows of narrower params ("pack64"): the
    param holds the EMA as a copy would round it; params and shadows come back bit for bit."""
    model, opt = trained(dtype, ema_dtype=torch.float64)
    before = snapshot(model, opt)
    outside = [v.clone() for v in opt.state_dict()["state"][0].values()]
    shadows = [opt.state[p]["ema"].clone() for p in model.parameters()]
    with opt.swap_ema_weights():
        assert [r.method for r in opt._rt.swapped] == ["pack64"] * 4
        assert all(r.stash is None for r in opt._rt.swapped)
        assert_same([bits(p) for p in model.parameters()], [bits(s.to(dtype)) for s in shadows])
        inside = list(opt.state_dict()["state"][0].values())
        assert all(torch.equal(a, b) for a, b in zip(inside, outside))
    assert_same(snapshot(model, opt)[0], before[0])
    assert_same(snapshot(model, opt)[1], before[1])
    with pytest.raises(KeyError):
        with opt.swap_ema_weights():
            raise KeyError("boom")
    assert_same(snapshot(model, opt)[0], before[0])
    assert_same(snapshot(model, opt)[1], before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_pack64_is_the_identity_on_random_bits_and_edge_values(dtype):
    ints = {32: torch.int32, 16: torch.int16}[torch.finfo(dtype).bits]
    tiny = torch.finfo(dtype).tiny
    g = torch.Generator().manual_seed(0)
    ema = torch.randn(5000, generator=g, dtype=torch.float64) * torch.finfo(dtype).max ** torch.rand(
        5000, generator=g, dtype=torch.float64
    )
    ema[:6] = torch.tensor([0.0, -0.0, tiny, -tiny, 1.0 - 2.0**-40, -(2.0 ** (-14))], dtype=torch.float64)
    rounded = ema.to(dtype)
    ema = ema[torch.isfinite(rounded) & ((rounded.double().abs() >= tiny) | (ema == 0))]  # packable
    train = _random_bits(ema.numel(), dtype, seed=1)
    assert all(_swap.packable([(ema, train, "pack64")]))
    s, p = ema.clone(), train.clone()
    _swap.pack64_(s, p)
    assert torch.equal(p.view(ints), ema.to(dtype).view(ints))
    _swap.unpack64_(s, p)
    assert torch.equal(s.view(torch.int64), ema.view(torch.int64)) and torch.equal(
        p.view(ints), train.view(ints)
    )


@pytest.mark.parametrize("value", [1e-300, 1e300, float("nan")])
def test_float64_ema_outside_the_param_range_falls_back_to_a_copy(value):
    model, opt = trained(torch.float16, ema_dtype=torch.float64)
    p = next(model.parameters())
    opt.state[p]["ema"][0, 0] = value
    before = snapshot(model, opt)
    with opt.swap_ema_weights():
        assert opt._rt.swapped[0].method == "copy"
    assert_same(snapshot(model, opt)[0], before[0])
    assert_same(snapshot(model, opt)[1], before[1])
