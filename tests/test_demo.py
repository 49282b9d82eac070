"""The demo (python -m ema_optim.demo): data, model, and a short run's JSON line."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from ema_optim import EMAOptimizer, demo

KEYS = ("mse", "mae", "r2", "val_loss_std")


def test_data_is_deterministic_for_a_seed():
    a, b, c = demo.make_data(0), demo.make_data(0), demo.make_data(1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_data_shapes_and_standardisation():
    x_train, y_train, x_val, y_val = demo.make_data(3)
    assert x_train.shape == (1600, 20) and y_train.shape == (1600, 1)
    assert x_val.shape == (400, 20) and y_val.shape == (400, 1)
    # The scaler is fitted on the training split: exactly mean 0, std 1 there (ddof=0) ...
    torch.testing.assert_close(x_train.mean(0), torch.zeros(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0, correction=0), torch.ones(20), atol=1e-5, rtol=0)
    assert abs(y_train.mean().item()) < 1e-5
    assert abs(y_train.std(correction=0).item() - 1) < 1e-5
    # ... and only close to it on the validation split, which it was not fitted on.
    assert not torch.allclose(x_val.mean(0), torch.zeros(20), atol=1e-5)
    assert x_val.mean(0).abs().max() < 0.3 and (x_val.std(0) - 1).abs().max() < 0.2


def test_target_is_linear_in_ten_features_with_small_noise():
    x_train, y_train, _, _ = demo.make_data(0)
    coef = torch.linalg.lstsq(x_train.double(), y_train.double()).solution.squeeze(1)
    informative = coef.abs() > 1e-3  # noise alone gives |coef| ~ 3e-5; 100 * U(0, 1) / ~180 is larger
    assert informative.sum() == 10
    # noise 0.1 against a raw target std of ~180: the linear fit explains all but ~1e-7.
    residual = y_train.double() - x_train.double() @ coef.unsqueeze(1)
    assert residual.var() < 1e-5


def test_model_architecture():
    torch.manual_seed(0)
    model = demo.build_model()
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    sizes = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    assert sizes == [(20, 64), (64, 32), (32, 1)]
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    for m in model:
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            # Xavier-normal: std sqrt(2 / (fan_in + fan_out)); loose, the layers are small.
            expected = math.sqrt(2.0 / (m.in_features + m.out_features))
            assert 0.7 * expected < m.weight.std().item() < 1.3 * expected
            # Normal, not uniform: ~8% of the weights lie beyond xavier_uniform's bound sqrt(3) * std.
            beyond = (m.weight.abs() > math.sqrt(3) * expected).float().mean().item()
            assert beyond > 0.02 or m.weight.numel() < 100


def test_optimizer_settings():
    model = demo.build_model()
    opt = demo.build_optimizer(model)
    assert isinstance(opt, EMAOptimizer) and isinstance(opt.optimizer, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 1e-5
    assert opt.update_after_step == 100 and opt.update_every == 1
    assert opt.decay(0) == 0.0 and opt.decay(10**9) == 0.999
    assert round(opt.decay(999), 6) == 0.99  # 1 - 1000 ** (-2/3)


def _last_json_line(out: str) -> dict:
    last = out.rstrip("\n").splitlines()[-1]
    return json.loads(last)


def test_main_json_is_the_last_line(capsys):
    threads = torch.get_num_threads()
    result = demo.main(["--epochs", "5", "--json", "--quiet", "--seed", "2"])
    out, err = capsys.readouterr()
    assert err == ""  # --quiet (and no terminal): no progress bar
    data = _last_json_line(out)
    assert set(data) == {"online", "ema", "epochs"}
    assert data["epochs"] == 5 == result["epochs"]
    for model in ("online", "ema"):
        assert set(data[model]) == set(KEYS)
        assert all(math.isfinite(data[model][k]) for k in KEYS)
        assert data[model]["mse"] == result[model]["mse"]
        # 5 epochs are enough to learn most of a linear target, not all of it.
        assert 0.5 < data[model]["r2"] < 1.0
    # After 250 steps the EMA (warm-up decay ~0.97) lags the online weights but is not a copy.
    assert data["online"]["mse"] != data["ema"]["mse"]
    assert torch.get_num_threads() == threads  # main() restores the thread count it changed


def test_main_is_reproducible():
    a = demo.main(["--epochs", "3", "--quiet"])
    b = demo.main(["--epochs", "3", "--quiet"])
    assert a["online"] == b["online"] and a["ema"] == b["ema"]


def test_module_runs_as_script():
    proc = subprocess.run(
        [sys.executable, "-m", "ema_optim.demo", "--epochs", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # stderr is a pipe here, so no progress bar
    data = _last_json_line(proc.stdout)
    assert data["epochs"] == 2
    assert "epoch | train loss | online val loss | online R² | EMA val loss |  EMA R²" in proc.stdout


def test_plot_without_matplotlib_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as info:
        demo.main(["--epochs", "1", "--quiet", "--plot", str(tmp_path / "x.png")])
    assert info.value.code == 2
    assert "pip install matplotlib (or pip install -e .[plot])" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    demo.main(["--epochs", "2", "--quiet", "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
