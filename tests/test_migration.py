"""docs/migration.md, row by row, against the installed releases of the libraries it covers.

Each test trains the same small model (Linear-BatchNorm-Tanh-Linear, float64, SGD with
momentum, fixed data) twice: once with the peer attached as its README shows, once with
`EMAOptimizer` set up as the guide says, and compares the averaged weights (and, where
buffers are involved, the eval outputs). The training weights of the two runs are checked
to be bit-identical first, so any gap is the EMA's. Each test also runs a wrong recipe
(usually the guide's old one, or the recipe off by one step) and checks that it misses by
far more than the tolerance, so the comparison can fail.

The peers come from the `peers` extra (ema-pytorch, diffusers, torch-ema; `make test`),
the `peers-timm` extra (timm + torchvision, only in the torch 2.15.0 compat venv) and a
`--no-deps` install of nemo-toolkit (see the Makefile). Without them these tests skip.
"""

import copy
import importlib.util
import math
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ema_optim import EMAOptimizer, posthoc, schedules

# float64 runs: a peer's `d * e + (1 - d) * w`, `e - (1 - d) * (e - w)` and ema_optim's lerp
# round differently, by ~1e-16 per update.
TOL = 1e-12
# ema-pytorch computes its warmup decay in a float32 tensor (`.item()` of a float32), so each
# decay it uses is off the float64 formula by up to 6e-8 relative (measured gaps: 1e-9 to 4e-8).
TOL_F32_DECAY = 2e-7
# A wrong recipe must miss by at least this many tolerances (measured: 1e4 to 1e11).
MISS = 1e3

X_EVAL = torch.randn(64, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 + 1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()


def _inner(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _batches(steps: int):
    # inputs far from N(0, 1), so that BatchNorm's running statistics move away from their
    # initial (0, 1) and the buffer averages' starting points matter
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64) * 2 + 1
        yield x, torch.sin(x[:, :3]) + 0.1 * torch.randn(16, 3, generator=g, dtype=torch.float64)


def _eval(model: nn.Module, x: torch.Tensor = X_EVAL) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


class Run(NamedTuple):
    ema: dict  # name -> averaged tensor, keyed like model.state_dict()
    out: torch.Tensor  # eval output of the averaged model on X_EVAL
    live: dict  # the training weights at the end


# A setup gets the fresh model and returns (optimizer to train with, after_step(n) or None,
# read() -> (ema dict, eval output)).
Setup = Callable[[nn.Module], tuple]


def _run(steps: int, setup: Setup) -> Run:
    model = _model()
    opt, after_step, read = setup(model)
    for n, (x, y) in enumerate(_batches(steps), 1):
        F.mse_loss(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step(n)
        opt.zero_grad()
    ema, out = read()
    return Run({k: v.detach().clone() for k, v in ema.items()}, out, copy.deepcopy(model.state_dict()))


def ours(buffers: bool = False, index: int = 0, **recipe) -> Setup:
    def setup(model):
        opt = EMAOptimizer(_inner(model), buffers=model if buffers else None, **recipe)

        def read():
            with opt.swap_ema_weights(index):
                return copy.deepcopy(model.state_dict()), _eval(model)

        return opt, None, read

    return setup


def _by_name(model: nn.Module, tensors) -> dict:
    """A peer's list of shadows (in `model.parameters()` order) keyed by param name."""
    names = [n for n, _ in model.named_parameters()]
    tensors = list(tensors)
    assert len(tensors) == len(names)
    return dict(zip(names, tensors))


def _gap(a: dict, b: dict, keys) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def _params(run: Run) -> list:
    return [n for n, _ in _model().named_parameters() if n in run.live]


def _float_entries(run: Run) -> list:
    return [k for k, v in run.live.items() if v.is_floating_point()]


def _check(peer: Run, mine: Run, keys, tol: float, *, outputs: bool) -> tuple:
    """The training weights of both runs are the same; the averages agree within `tol`."""
    assert all(torch.equal(peer.live[k], mine.live[k]) for k in peer.live), "the two runs trained differently"
    gap = _gap(peer.ema, mine.ema, keys)
    out_gap = (peer.out - mine.out).abs().max().item()
    assert gap <= tol, f"averaged weights {gap:.3g} apart (tolerance {tol:g})"
    if outputs:
        assert out_gap <= tol, f"eval outputs {out_gap:.3g} apart (tolerance {tol:g})"
    return gap, out_gap


def _misses(peer: Run, wrong: Run, keys, tol: float) -> float:
    gap = _gap(peer.ema, wrong.ema, keys)
    assert gap > MISS * tol, f"the wrong recipe is only {gap:.3g} off: the comparison cannot tell"
    return gap


# --- timm ModelEmaV2 / ModelEmaV3 -----------------------------------------------------------


def timm_v2(decay: float, set_first: bool = False) -> Setup:
    """timm's README loop: `ModelEmaV2(model, decay)`, `ema.update(model)` after each step
    (`set_first`: `ema.set(model)` instead of the first update)."""
    from timm.utils import ModelEmaV2

    def setup(model):
        ema = ModelEmaV2(model, decay=decay)

        def after_step(n):
            ema.set(model) if set_first and n == 1 else ema.update(model)

        return _inner(model), after_step, lambda: (ema.module.state_dict(), _eval(ema.module))

    return setup


def timm_v3(with_step: bool, **kwargs) -> Setup:
    """`ModelEmaV3(model, **kwargs)`, `ema.update(model, step=n)` (n = optimizer steps done, as
    timm's train.py counts them) or, without `with_step`, `ema.update(model)`."""
    from timm.utils import ModelEmaV3

    def setup(model):
        ema = ModelEmaV3(model, **kwargs)

        def after_step(n):
            ema.update(model, step=n) if with_step else ema.update(model)

        return _inner(model), after_step, lambda: (ema.module.state_dict(), _eval(ema.module))

    return setup


@pytest.mark.parametrize("version", ["V2", "V3 update(model)"])
@pytest.mark.parametrize("decay, steps", [(0.9, 30), (0.99, 100)])
def test_timm_params_match_defaults_buffers_start_differently(version, decay, steps):
    """Params: ModelEmaV2 (and V3 without `step=`) is ema_optim's defaults. Buffers with
    `buffers=model`: timm's average starts from the buffers as built, ema_optim's from their
    values at the first `step()`, after the first forward: they differ (the guide says so)."""
    pytest.importorskip("timm")
    peer = _run(steps, timm_v2(decay) if version == "V2" else timm_v3(False, decay=decay))
    mine = _run(steps, ours(decay=decay, buffers=True))
    _check(peer, mine, _params(peer), TOL, outputs=False)
    buffers = [k for k in _float_entries(peer) if "running" in k]
    assert _gap(peer.ema, mine.ema, buffers) > 1e-3
    assert (peer.out - mine.out).abs().max().item() > 1e-3


@pytest.mark.parametrize("decay, steps", [(0.9, 30), (0.99, 100)])
def test_timm_v2_buffers_exact_recipe(decay, steps):
    """Everything, buffers and eval outputs included: `ema.set(model)` after the first step
    (timm) and `update_after_step=1` (ema_optim)."""
    pytest.importorskip("timm")
    peer = _run(steps, timm_v2(decay, set_first=True))
    keys = _float_entries(peer)
    _check(peer, _run(steps, ours(decay=decay, buffers=True, update_after_step=1)), keys, TOL, outputs=True)
    _misses(peer, _run(steps, ours(decay=decay, buffers=True)), keys, TOL)


@pytest.mark.parametrize("a", [0, 3])
def test_timm_v3_with_step(a):
    """`ModelEmaV3(decay=d, update_after_step=a)` with `update(model, step=n)` copies for the
    first `a + 1` steps: `update_after_step=a + 1`, buffers and eval outputs included."""
    pytest.importorskip("timm")
    peer = _run(40, timm_v3(True, decay=0.9, update_after_step=a))
    keys = _float_entries(peer)
    _check(peer, _run(40, ours(decay=0.9, buffers=True, update_after_step=a + 1)), keys, TOL, outputs=True)
    _misses(peer, _run(40, ours(decay=0.9, buffers=True, update_after_step=a)), keys, TOL)


def _warmup_shifted(**kw) -> Callable[[int], float]:
    w = schedules.warmup(**kw)
    return lambda t: w(t + 1)


@pytest.mark.parametrize("a, min_decay", [(0, 0.0), (4, 0.0), (4, 0.3)])
def test_timm_v3_warmup(a, min_decay):
    """`use_warmup=True`: `update_after_step=a + 1, decay=lambda t: w(t + 1)` always;
    `update_after_step=a, decay=w` when `min_decay=0` (w(0) = 0 is a copy)."""
    pytest.importorskip("timm")
    kw = dict(max_decay=0.99, inv_gamma=2.0, power=0.75, min_decay=min_decay)
    peer = _run(
        60,
        timm_v3(
            True,
            decay=0.99,
            update_after_step=a,
            use_warmup=True,
            warmup_gamma=2.0,
            warmup_power=0.75,
            min_decay=min_decay,
        ),
    )
    keys = _float_entries(peer)
    exact = ours(decay=_warmup_shifted(**kw), buffers=True, update_after_step=a + 1)
    _check(peer, _run(60, exact), keys, TOL, outputs=True)
    short = _run(60, ours(decay=schedules.warmup(**kw), buffers=True, update_after_step=a))
    if min_decay == 0:
        _check(peer, short, keys, TOL, outputs=True)
        _misses(
            peer,
            _run(60, ours(decay=schedules.warmup(**kw), buffers=True, update_after_step=a + 1)),
            keys,
            TOL,
        )
    else:
        _misses(peer, short, keys, TOL)


# --- torch.optim.swa_utils.AveragedModel ----------------------------------------------------


def averaged_model(decay: float, use_buffers: bool) -> Setup:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def setup(model):
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
        return (
            _inner(model),
            lambda n: ema.update_parameters(model),
            lambda: (ema.module.state_dict(), _eval(ema)),
        )

    return setup


@pytest.mark.parametrize("use_buffers", [False, True])
def test_averaged_model(use_buffers):
    """`get_ema_multi_avg_fn(d)`: the first `update_parameters` copies, so `update_after_step=1`;
    `use_buffers=True` is `buffers=model`, the default `use_buffers=False` (buffers kept in sync
    with the training model) is `buffers=None` (live statistics inside the swap)."""
    peer = _run(40, averaged_model(0.9, use_buffers))
    keys = _float_entries(peer)  # use_buffers=False: its buffers are the live ones, so are ours
    _check(peer, _run(40, ours(decay=0.9, buffers=use_buffers, update_after_step=1)), keys, TOL, outputs=True)
    _misses(peer, _run(40, ours(decay=0.9, buffers=use_buffers)), _params(peer), TOL)


# --- diffusers EMAModel ---------------------------------------------------------------------


def diffusers_ema(**kwargs) -> Setup:
    from diffusers.training_utils import EMAModel

    def setup(model):
        ema = EMAModel(model.parameters(), **kwargs)

        def read():
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            averaged, out = copy.deepcopy(model.state_dict()), _eval(model)
            ema.restore(model.parameters())
            return averaged, out

        return _inner(model), lambda n: ema.step(model.parameters()), read

    return setup


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("a", [0, 2])
def test_diffusers_default_warmup(a, foreach):
    """Without `use_ema_warmup`, EMAModel still warms up with `min(decay, (1 + s) / (10 + s))`:
    `update_after_step=a + 1, decay=lambda t: min(d, (2 + t) / (11 + t))`. The guide's old
    recipe (a constant decay) is far off."""
    pytest.importorskip("diffusers")
    peer = _run(40, diffusers_ema(decay=0.9, update_after_step=a, foreach=foreach))
    keys = _float_entries(peer)  # params averaged, buffers live on both sides
    recipe = dict(decay=lambda t: min(0.9, (2 + t) / (11 + t)), update_after_step=a + 1)
    _check(peer, _run(40, ours(**recipe)), keys, TOL, outputs=True)
    _misses(peer, _run(40, ours(decay=0.9, update_after_step=a + 1)), keys, TOL)


@pytest.mark.parametrize("a, min_decay", [(0, 0.0), (4, 0.0), (4, 0.3)])
def test_diffusers_warmup(a, min_decay):
    """`use_ema_warmup=True`: the same mapping as timm V3's warmup."""
    pytest.importorskip("diffusers")
    peer = _run(
        60,
        diffusers_ema(
            decay=0.99,
            update_after_step=a,
            use_ema_warmup=True,
            inv_gamma=2.0,
            power=0.75,
            min_decay=min_decay,
        ),
    )
    keys = _float_entries(peer)
    kw = dict(max_decay=0.99, inv_gamma=2.0, power=0.75, min_decay=min_decay)
    _check(
        peer, _run(60, ours(decay=_warmup_shifted(**kw), update_after_step=a + 1)), keys, TOL, outputs=True
    )
    short = _run(60, ours(decay=schedules.warmup(**kw), update_after_step=a))
    if min_decay == 0:
        _check(peer, short, keys, TOL, outputs=True)
        _misses(peer, _run(60, ours(decay=schedules.warmup(**kw), update_after_step=a + 1)), keys, TOL)
    else:
        _misses(peer, short, keys, TOL)


def test_diffusers_copies_frozen_params():
    """What the guide says: EMAModel copies a param with `requires_grad=False` instead of
    averaging it; ema_optim averages every param of its groups."""
    pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    frozen = nn.Parameter(torch.zeros(3, dtype=torch.float64), requires_grad=False)
    ema = EMAModel([frozen], decay=0.9)
    opt = EMAOptimizer(torch.optim.SGD([frozen], lr=0.1), decay=0.9)
    for step in range(1, 6):
        with torch.no_grad():
            frozen.fill_(float(step))  # changed by hand (a schedule, a buffer-like param)
        opt.step()
        ema.step([frozen])
    assert torch.equal(ema.shadow_params[0], frozen.detach())  # a copy: 5
    assert (opt.state[frozen]["ema"] < 4.5).all()  # an average of 1..5


# --- ema-pytorch EMA / KarrasEMA / PostHocEMA -----------------------------------------------


def ema_pytorch_ema(**kwargs) -> Setup:
    from ema_pytorch import EMA

    def setup(model):
        ema = EMA(model, **kwargs)
        return (
            _inner(model),
            lambda n: ema.update(),
            lambda: (ema.ema_model.state_dict(), _eval(ema.ema_model)),
        )

    return setup


def ema_pytorch_recipe(beta, a, e, inv_gamma=1.0, power=2 / 3, min_value=0.0) -> dict:
    """The guide's exact equivalent of `EMA(model, beta, update_after_step=a, update_every=e, ...)`."""
    w = schedules.warmup(max_decay=beta, inv_gamma=inv_gamma, power=power, min_decay=min_value)
    k = a // e
    return dict(update_after_step=1 + k * e, update_every=e, decay=lambda t: w((k + t + 1) * e - a))


@pytest.mark.parametrize(
    "a, e, steps",
    # (100, 10): ema-pytorch's defaults. With e = 1 the runs are short: its warmup forgets the
    # start quickly, so an off-by-one at the start fades (the old recipe: 3e-6 off after 40 steps)
    [(0, 1, 6), (5, 1, 11), (7, 3, 60), (100, 10, 200)],
)
def test_ema_pytorch(a, e, steps):
    """`EMA(model, beta, update_after_step=a, update_every=e)` copies on its first call and on
    each e-th call up to `a`, then averages with its warmup at epoch `call - a - 1`:
    `update_after_step=1 + (a // e) * e, decay=lambda t: w((a // e + t + 1) * e - a)`, float
    buffers with `buffers=model`. The guide's old recipe (`a + 2`, `w(t + 2)`) is off."""
    pytest.importorskip("ema_pytorch")
    kw = dict(beta=0.99, inv_gamma=2.0, power=0.75, min_value=0.1)
    peer = _run(steps, ema_pytorch_ema(update_after_step=a, update_every=e, **kw))
    keys = _float_entries(peer)
    mine = _run(steps, ours(buffers=True, **ema_pytorch_recipe(a=a, e=e, **kw)))
    _check(peer, mine, keys, TOL_F32_DECAY, outputs=True)
    w = schedules.warmup(max_decay=0.99, inv_gamma=2.0, power=0.75, min_decay=0.1)
    old = ours(buffers=True, update_after_step=a + 2, update_every=e, decay=lambda t: w(t + 2))
    _misses(peer, _run(steps, old), keys, TOL_F32_DECAY)


def karras_recipe(gamma: float, e: int) -> dict:
    """KarrasEMA's own numbers: it copies on the first call, then uses `(u / (u + 1)) ** (1 + gamma)`
    with `u` the count of `update()` calls made, on every e-th call."""
    p = schedules.power(gamma=gamma)
    return dict(update_after_step=1, update_every=e, decay=lambda t: p((t + 1) * e + 1))


@pytest.mark.parametrize("e, steps", [(1, 40), (4, 81)])
def test_ema_pytorch_karras(e, steps):
    """KarrasEMA(sigma_rel=s, update_every=e): its sigma_rel -> gamma is ours; its numbers are
    `karras_recipe`; `schedules.power(sigma_rel=s)` (the profile over ema_optim's count of
    updates) is a different average, not a drop-in."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    from ema_pytorch import KarrasEMA

    s = 0.15
    assert abs(ema_pytorch.post_hoc_ema.sigma_rel_to_gamma(s) - posthoc.sigma_rel_to_gamma(s)) < 1e-9
    gamma = posthoc.sigma_rel_to_gamma(s)

    def setup(model):
        ema = KarrasEMA(model, sigma_rel=s, update_every=e)
        return (
            _inner(model),
            lambda n: ema.update(),
            lambda: (ema.ema_model.state_dict(), _eval(ema.ema_model)),
        )

    peer = _run(steps, setup)
    keys = _float_entries(peer)
    _check(peer, _run(steps, ours(buffers=True, **karras_recipe(gamma, e))), keys, TOL, outputs=True)
    _misses(
        peer, _run(steps, ours(buffers=True, update_every=e, decay=schedules.power(sigma_rel=s))), keys, TOL
    )


def test_ema_pytorch_posthoc_differences(tmp_path):
    """What the guide says of PostHocEMA: `synthesize_ema_model(step=n)` takes every checkpoint
    in the folder; at a checkpoint time the later ones get zero weight (to rounding), between
    checkpoint times they do count; and the coefficients are not normalised (a constant weight
    does not come back as itself)."""
    pytest.importorskip("ema_pytorch")
    from ema_pytorch import PostHocEMA

    model = nn.Linear(1, 1, bias=False).double()
    emas = PostHocEMA(
        model,
        sigma_rels=(0.05, 0.10),
        update_every=1,
        checkpoint_every_num_steps=10,
        checkpoint_folder=str(tmp_path),
        checkpoint_dtype=torch.float64,
    )
    for step in range(1, 41):  # checkpoints at 10, 20, 30, 40
        with torch.no_grad():
            model.weight.fill_(1.0 if step <= 25 else 100.0)
        emas.update()
    at_20 = emas.synthesize_ema_model(sigma_rel=0.15, step=20).ema_model.weight.item()
    at_25 = emas.synthesize_ema_model(sigma_rel=0.15, step=25).ema_model.weight.item()
    # every weight up to step 25 is 1: 0.880 is the sum of the raw coefficients, and the
    # checkpoints at 30 and 40 (holding the 100s) add nothing to it
    assert abs(at_20 - 0.8797) < 1e-3
    # at step 25 (no checkpoint) they do: weights from after step 25 are in the "EMA at 25"
    assert at_25 > 10.0  # 19.06 with ema-pytorch 0.8.3


def test_ema_pytorch_update_every_warps_the_profile():
    """KarrasEMA counts `update()` calls, not averages: with `update_every=100` a profile set to
    sigma_rel 0.05 is centred at 0.15 T with sigma_rel 0.24 (T = calls made); ema_optim's
    `schedules.power(sigma_rel=0.05)` stays at 0.05 and ~0.95 T. Read off a weight that holds
    k / T (first moment) and (k / T) ** 2 (second moment) at call k."""
    pytest.importorskip("ema_pytorch")
    from ema_pytorch import KarrasEMA

    steps = 5000

    def profile(update_every, use_ours):
        model = nn.Linear(2, 1, bias=False).double()
        if use_ours:
            opt = EMAOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.0),
                update_every=update_every,
                decay=schedules.power(sigma_rel=0.05),
            )
            model.weight.grad = torch.zeros_like(model.weight)
            update = opt.step
        else:
            ema = KarrasEMA(model, sigma_rel=0.05, update_every=update_every)
            update = ema.update
        for k in range(1, steps + 1):
            with torch.no_grad():
                model.weight.copy_(torch.tensor([[k / steps, (k / steps) ** 2]]))
            update()
        if use_ours:
            with opt.swap_ema_weights():
                mean, square = model.weight[0].tolist()
        else:
            mean, square = ema.ema_model.weight[0].tolist()
        return mean, math.sqrt(square - mean**2)  # centre and sigma_rel, in units of T

    for use_ours in (False, True):  # every call averages: the same profile
        centre, sigma_rel = profile(1, use_ours)
        assert abs(centre - 0.947) < 0.005 and abs(sigma_rel - 0.05) < 0.002
    centre, sigma_rel = profile(100, use_ours=False)
    assert abs(centre - 0.15) < 0.01 and abs(sigma_rel - 0.24) < 0.01
    centre, sigma_rel = profile(100, use_ours=True)  # 50 averages: a coarser but true profile
    assert centre > 0.93 and abs(sigma_rel - 0.05) < 0.005


# --- torch-ema ------------------------------------------------------------------------------


def torch_ema(decay: float, use_num_updates: bool) -> Setup:
    from torch_ema import ExponentialMovingAverage

    def setup(model):
        ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=use_num_updates)

        def read():
            with ema.average_parameters():
                return copy.deepcopy(model.state_dict()), _eval(model)

        return _inner(model), lambda n: ema.update(), read

    return setup


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_torch_ema(use_num_updates):
    """Starts from the weights at construction and averages from the first update:
    `decay=lambda t: min(d, (2 + t) / (11 + t))` with `use_num_updates=True` (its default),
    `decay=d` without."""
    pytest.importorskip("torch_ema")
    peer = _run(40, torch_ema(0.9, use_num_updates))
    keys = _float_entries(peer)
    decay = (lambda t: min(0.9, (2 + t) / (11 + t))) if use_num_updates else 0.9
    _check(peer, _run(40, ours(decay=decay)), keys, TOL, outputs=True)
    _misses(peer, _run(40, ours(decay=decay, update_after_step=1)), keys, TOL)


# --- NeMo EMA callback's EMAOptimizer -------------------------------------------------------


def _nemo_ema_module():
    """NeMo's `nemo/collections/common/callbacks/ema.py`, loaded on its own: the package's
    `__init__` needs NeMo's `core` extra (hydra, lightning<=2.4, ...), the file only torch and
    lightning. The Makefile installs nemo-toolkit with `--no-deps` for this."""
    spec = importlib.util.find_spec("nemo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nemo-toolkit is not installed")
    pytest.importorskip("lightning")
    path = Path(list(spec.submodule_search_locations)[0]) / "collections" / "common" / "callbacks" / "ema.py"
    file_spec = importlib.util.spec_from_file_location("_nemo_ema_callback", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("every_n_steps", [1, 3])
def test_nemo(every_n_steps):
    """NeMo's EMAOptimizer copies the weights at its first `step()` and averages on steps 1,
    1 + e, 1 + 2e, ...: with `every_n_steps=1` it is ema_optim's defaults; with e > 1 ema_optim
    averages on steps e, 2e, ... instead (the guide says so)."""
    nemo_ema = _nemo_ema_module()

    def setup(model):
        opt = nemo_ema.EMAOptimizer(
            _inner(model), torch.device("cpu"), decay=0.9, every_n_steps=every_n_steps
        )

        def read():
            assert {"opt", "ema", "current_step"} <= set(opt.state_dict())  # its own layout (the guide)
            with opt.swap_ema_weights():
                return copy.deepcopy(model.state_dict()), _eval(model)

        return opt, None, read

    peer = _run(40, setup)
    keys = _float_entries(peer)
    mine = _run(40, ours(decay=0.9, update_every=every_n_steps))
    if every_n_steps == 1:
        _check(peer, mine, keys, TOL, outputs=True)
        _misses(peer, _run(40, ours(decay=0.9, update_after_step=1)), keys, TOL)
    else:
        _misses(peer, mine, keys, TOL)


# --- the guide's own snippets: the hand-written class, guided-diffusion's update_ema ---------


def test_hand_written_class():
    """The classic class (`shadow = param.clone()` at `register()`, `shadow = d * shadow +
    (1 - d) * param` at `update()`) is ema_optim's defaults."""

    def setup(model):
        shadow = {n: p.detach().clone() for n, p in model.named_parameters()}  # ema.register()

        def update(n):
            for name, p in model.named_parameters():
                shadow[name] = 0.9 * shadow[name] + (1 - 0.9) * p.detach()

        def read():
            backup = {n: p.detach().clone() for n, p in model.named_parameters()}  # apply_shadow()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(shadow[name])
            averaged, out = copy.deepcopy(model.state_dict()), _eval(model)
            with torch.no_grad():  # restore()
                for name, p in model.named_parameters():
                    p.copy_(backup[name])
            return averaged, out

        return _inner(model), update, read

    peer = _run(40, setup)
    keys = _float_entries(peer)
    _check(peer, _run(40, ours(decay=0.9)), keys, TOL, outputs=True)
    _misses(peer, _run(40, ours(decay=0.9, update_after_step=1)), keys, TOL)


@pytest.mark.parametrize("index", [0, 1])
def test_guided_diffusion_rates(index):
    """guided-diffusion's `ema_rate="0.99,0.9"`: one copy of the params per rate, taken at
    construction, `targ.mul_(rate).add_(src, alpha=1 - rate)` after each step: `decay=(0.99, 0.9)`,
    shadow `index` for rate `index`."""
    rates = (0.99, 0.9)

    def setup(model):
        ema_params = [[p.detach().clone() for p in model.parameters()] for _ in rates]

        def update(n):
            for rate, params in zip(rates, ema_params):
                for targ, src in zip(params, model.parameters()):
                    targ.mul_(rate).add_(src.detach(), alpha=1 - rate)

        def read():
            averaged = {**model.state_dict(), **_by_name(model, ema_params[index])}
            clone = copy.deepcopy(model)
            clone.load_state_dict(averaged)
            return averaged, _eval(clone)

        return _inner(model), update, read

    peer = _run(40, setup)
    keys = _float_entries(peer)
    _check(peer, _run(40, ours(decay=rates, index=index)), keys, TOL, outputs=True)
    _misses(peer, _run(40, ours(decay=rates, index=1 - index)), keys, TOL)


# --- buffers= and torch.compile -------------------------------------------------------------


def test_compiled_module_buffer_names(tmp_path):
    """`torch.compile(model)` returns a wrapper whose buffers are named `_orig_mod.<name>`: a
    state dict saved with `buffers=torch.compile(model)` does not load with `buffers=model`
    (clear ValueError); `buffers=model` while training through the compiled module averages
    the same tensors; the guide's renaming loop converts an old state dict."""
    steps = 6

    def train(buffers_of):
        model = _model()
        compiled = torch.compile(model, backend="eager")  # the wrapper; eager keeps the test fast
        opt = EMAOptimizer(_inner(model), decay=0.9, buffers=buffers_of(model, compiled))
        for x, y in _batches(steps):
            F.mse_loss(compiled(x), y).backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    model_c, opt_c = train(lambda m, c: c)
    model_m, opt_m = train(lambda m, c: m)
    with opt_c.swap_ema_weights():
        averaged_c = copy.deepcopy(model_c.state_dict())
    with opt_m.swap_ema_weights():
        averaged_m = copy.deepcopy(model_m.state_dict())
    assert all(torch.equal(averaged_c[k], averaged_m[k]) for k in averaged_m)

    torch.save(opt_c.state_dict(), tmp_path / "opt.pt")
    fresh = _model()
    opt = EMAOptimizer(_inner(fresh), decay=0.9, buffers=fresh)
    with pytest.raises(ValueError, match="_orig_mod"):
        opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))

    # the guide's conversion, as written there
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    for s in sd["state"].values():
        for k in [k for k in s if isinstance(k, str) and ":_orig_mod." in k]:
            s[k.replace(":_orig_mod.", ":", 1)] = s.pop(k)
    opt.load_state_dict(sd)
    fresh.load_state_dict(model_c.state_dict())
    with opt.swap_ema_weights():
        assert all(torch.equal(v, averaged_c[k]) for k, v in fresh.state_dict().items())

    in_place = _model()
    in_place.compile(backend="eager")  # nn.Module.compile() keeps the module and its names
    assert [n for n, _ in in_place.named_buffers()] == [n for n, _ in _model().named_buffers()]
