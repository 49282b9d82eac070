"""EMAOptimizer inside the trainers people use: Lightning, Accelerate, transformers.Trainer.

Each group skips cleanly when its extra (``pip install "ema_optim[lightning]"`` and so on)
is not installed. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from ema_optim import EMAOptimizer

DECAY = 0.8


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def make_data(n: int = 32, seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g))


def shadows(opt: EMAOptimizer, params) -> list[torch.Tensor]:
    return [opt.state[p]["ema"].clone() for p in params]


def test_core_package_does_not_import_the_trainers():
    code = (
        "import sys, ema_optim, ema_optim.lightning;"
        "names = ('lightning', 'pytorch_lightning', 'accelerate', 'transformers');"
        "bad = [m for m in names if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------- Lightning


def _lightning():
    pl = pytest.importorskip("lightning.pytorch")
    from ema_optim.lightning import EMASwap

    class Lit(pl.LightningModule):
        """Records, at each validation/test batch, the params the model holds."""

        def __init__(self, ema: bool = True, fail_validation: bool = False):
            super().__init__()
            self.net = make_model()
            self.ema, self.fail_validation = ema, fail_validation
            self.seen: dict[str, list[list[torch.Tensor]]] = {"val": [], "test": []}
            self.after_batch: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.after_batch = [p.detach().clone() for p in self.parameters()]

        def _record(self, kind, batch):
            if self.fail_validation and self.trainer.global_step > 0:
                raise ValueError("validation failed")
            self.seen[kind].append([p.detach().clone() for p in self.parameters()])
            x, y = batch
            self.log(f"{kind}_loss", nn.functional.mse_loss(self.net(x), y))

        def validation_step(self, batch, batch_idx):
            self._record("val", batch)

        def test_step(self, batch, batch_idx):
            self._record("test", batch)

        def predict_step(self, batch, batch_idx):
            self.seen.setdefault("predict", []).append([p.detach().clone() for p in self.parameters()])
            return self.net(batch[0])

        def configure_optimizers(self):
            inner = torch.optim.AdamW(self.parameters(), lr=1e-2)
            opt = EMAOptimizer(inner, decay=DECAY) if self.ema else inner
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3)}

    def loader():
        return torch.utils.data.DataLoader(make_data(), batch_size=8)

    def trainer(tmp_path, **kwargs):
        kwargs = {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": tmp_path,
            **kwargs,
        }
        return pl.Trainer(**kwargs)

    return pl, EMASwap, Lit, loader, trainer


@pytest.fixture
def quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")
        yield


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_checkpoint_resume_is_exact(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    ckpt = tmp_path / "epoch1.ckpt"

    torch.manual_seed(0)
    full = Lit()
    t = trainer(tmp_path / "full", max_epochs=2)
    t.fit(full, loader())

    torch.manual_seed(0)
    half = Lit()
    t = trainer(tmp_path / "half", max_epochs=1)
    t.fit(half, loader())
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)  # Lightning's checkpoint carries the shadows
    params = list(half.parameters())
    for i, p in enumerate(params):
        assert torch.equal(saved["optimizer_states"][0]["state"][i]["ema"], t.optimizers[0].state[p]["ema"])

    torch.manual_seed(0)
    resumed = Lit()
    t2 = trainer(tmp_path / "resumed", max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    opt_full, opt_resumed = trainer_optimizer(full), trainer_optimizer(resumed)
    assert isinstance(opt_resumed, EMAOptimizer) and opt_resumed._rt.counters.steps == 8
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt_full.state[a]["ema"], opt_resumed.state[b]["ema"])


def trainer_optimizer(module):
    return module.trainer.optimizers[0]


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_emaswap_validates_on_ema_and_checkpoints_training_weights(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Lit()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    # EMASwap listed after ModelCheckpoint on purpose: Lightning runs checkpoint callbacks last.
    t = trainer(tmp_path, max_epochs=2, callbacks=[checkpoint, EMASwap()], num_sanity_val_steps=1)
    t.fit(model, loader(), loader())
    opt = t.optimizers[0]
    params = list(model.parameters())
    # sanity check (before any step, no shadows yet): the initial weights; then 2 epochs x 4 batches
    assert len(model.seen["val"]) == 1 + 2 * 4
    final_shadows = shadows(opt, params)
    for seen in model.seen["val"][-4:]:
        assert all(torch.equal(a, b) for a, b in zip(seen, final_shadows))
    assert not all(torch.equal(a, b) for a, b in zip(final_shadows, params))
    # after validation the training weights are back, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(model.after_batch, params))

    # The checkpoint saved at the end of validation has the training weights and the EMA.
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    for i, (name, p) in enumerate(model.named_parameters()):
        assert torch.equal(saved["state_dict"][name], p)
        assert torch.equal(saved["optimizer_states"][0]["state"][i]["ema"], opt.state[p]["ema"])

    # test() after fit, on the same Trainer, also runs on the EMA weights
    t.test(model, loader())
    assert all(torch.equal(a, b) for a, b in zip(model.seen["test"][0], final_shadows))
    assert all(torch.equal(a, b) for a, b in zip(model.after_batch, params))


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_emaswap_test_from_checkpoint_uses_its_ema(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    model = Lit()
    t = trainer(tmp_path, max_epochs=1, callbacks=[EMASwap()])
    t.fit(model, loader())
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    ema = [s.clone() for s in shadows(t.optimizers[0], model.parameters())]
    trained = [p.detach().clone() for p in model.parameters()]

    fresh = Lit()  # a new process would start like this: no fit(), no optimizers
    t2 = trainer(tmp_path, callbacks=[EMASwap()])
    t2.test(fresh, loader(), ckpt_path=path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.seen["test"][0], ema))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), trained))
    t2.predict(fresh, loader(), ckpt_path=path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.seen["predict"][0], ema))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), trained))


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_emaswap_test_after_fit_uses_the_checkpoints_ema(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Lit()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    t = trainer(tmp_path, max_epochs=2, callbacks=[EMASwap(), checkpoint])
    t.fit(model, loader())
    first = tmp_path / "epoch=0.ckpt"
    saved = torch.load(first, weights_only=True)
    n = len(list(model.parameters()))
    ema0 = [saved["optimizer_states"][0]["state"][i]["ema"] for i in range(n)]
    assert not all(torch.equal(a, s) for a, s in zip(ema0, shadows(t.optimizers[0], model.parameters())))
    t.test(model, loader(), ckpt_path=first)  # the epoch-0 weights and the epoch-0 EMA, not the final one
    assert all(torch.equal(a, b) for a, b in zip(model.seen["test"][0], ema0))
    assert all(torch.equal(p, saved["state_dict"][name]) for name, p in model.named_parameters())


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_emaswap_restores_weights_when_validation_raises(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    model = Lit(fail_validation=True)
    t = trainer(tmp_path, max_epochs=1, callbacks=[EMASwap()], num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="validation failed"):
        t.fit(model, loader(), loader())
    opt = t.optimizers[0]
    assert opt._rt.swapped is None
    assert all(torch.equal(a, b) for a, b in zip(model.after_batch, model.parameters()))
    assert not all(torch.equal(opt.state[p]["ema"], p) for p in model.parameters())


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_emaswap_without_ema_optimizer_says_so(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    t = trainer(tmp_path, max_epochs=1, callbacks=[EMASwap()])
    with pytest.raises(
        RuntimeError, match="EMASwap found no EMAOptimizer: trainer.optimizers holds \\['AdamW'\\]"
    ):
        t.fit(Lit(ema=False), loader(), loader())
    t = trainer(tmp_path, callbacks=[EMASwap()])
    with pytest.raises(RuntimeError, match="no optimizers .*without a previous fit"):
        t.validate(Lit(), loader())


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_emaswap_flags_turn_stages_off(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    model = Lit()
    t = trainer(tmp_path, max_epochs=1, callbacks=[EMASwap(validate=False)], num_sanity_val_steps=0)
    t.fit(model, loader(), loader())
    assert all(torch.equal(a, b) for a, b in zip(model.seen["val"][-1], model.parameters()))


@pytest.mark.usefixtures("quiet_lightning")
def test_lightning_swap_through_self_optimizers_reaches_the_real_optimizer(tmp_path):
    pl, EMASwap, Lit, loader, trainer = _lightning()
    model = Lit()
    t = trainer(tmp_path, max_epochs=1)
    t.fit(model, loader())
    real = t.optimizers[0]
    proxy = model.optimizers()  # Lightning's LightningOptimizer, a subclass proxy of EMAOptimizer
    assert proxy is not real and isinstance(proxy, EMAOptimizer)
    params = list(model.parameters())
    ema, trained = shadows(real, params), [p.detach().clone() for p in params]
    with proxy.swap_ema_weights():
        assert all(torch.equal(p, s) for p, s in zip(params, ema))
        with pytest.raises(RuntimeError, match="inside swap_ema_weights"):
            real.step()
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with real.swap_ema_weights():
                pass
        saved = real.state_dict()  # what a checkpoint taken inside the block would hold
        assert all(torch.equal(saved["state"][i]["ema"], s) for i, s in enumerate(ema))
    assert all(torch.equal(a, b) for a, b in zip(trained, params))
    # the proxy's state_dict is the real one's, counters included
    by_proxy, by_real = proxy.state_dict(), real.state_dict()
    assert by_proxy["param_groups"] == by_real["param_groups"] and by_real["param_groups"][0]["ema_steps"] > 0
    assert all(torch.equal(by_proxy["state"][i]["ema"], s) for i, s in enumerate(ema))
    assert "_marked" not in proxy.__dict__


# ---------------------------------------------------------------------------------- Accelerate


def _accelerate_run(accelerate, data_seeds=(1,), save_dir=None, load_dir=None, accumulation=2):
    """Train with accelerator.accumulate (4 batches of 8 per data seed); return the model, the
    prepared optimizer, the weights at the first step and after every real step (float64)."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = make_model()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), decay=DECAY)
    model, opt = accelerator.prepare(model, opt)
    if load_dir is not None:
        accelerator.load_state(load_dir)
    initial, after = None, []
    for seed in data_seeds:
        for x, y in torch.utils.data.DataLoader(make_data(32, seed=seed), batch_size=8):
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and initial is None:
                    initial = [p.detach().double().clone() for p in model.parameters()]
                opt.step()  # a no-op on the accumulation micro-batches
                opt.zero_grad()
                if accelerator.sync_gradients:
                    after.append([p.detach().double().clone() for p in model.parameters()])
    if save_dir is not None:
        accelerator.save_state(save_dir)
    return model, opt, initial, after


def test_accelerate_prepare_accumulate_and_swap():
    accelerate = pytest.importorskip("accelerate")
    model, opt, initial, after = _accelerate_run(accelerate, data_seeds=(1, 2))
    assert type(opt).__name__ == "AcceleratedOptimizer" and isinstance(opt.optimizer, EMAOptimizer)
    assert opt.optimizer._rt.counters.steps == 4 and len(after) == 4  # 8 micro-batches, accumulation 2
    # float64 reference: ema = d*ema + (1-d)*w after each real step, from the weights at the first step
    ref = [w.clone() for w in initial]
    for weights in after:
        ref = [DECAY * e + (1 - DECAY) * w for e, w in zip(ref, weights)]
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(opt.state[p]["ema"].double(), r, rtol=0, atol=2e-6)

    # swap is reachable through the prepared optimizer: opt.optimizer is the EMAOptimizer
    ema = shadows(opt.optimizer, model.parameters())
    trained = [p.detach().clone() for p in model.parameters()]
    with opt.optimizer.swap_ema_weights():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema))
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters()))


def test_accelerate_save_state_load_state_resume_is_exact(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    full, full_opt, _, _ = _accelerate_run(accelerate, data_seeds=(1, 2))
    _accelerate_run(accelerate, data_seeds=(1,), save_dir=tmp_path / "state")
    resumed, resumed_opt, _, _ = _accelerate_run(accelerate, data_seeds=(2,), load_dir=tmp_path / "state")
    assert resumed_opt.optimizer._rt.counters.steps == 4
    assert resumed_opt.state is resumed_opt.optimizer.optimizer.state  # still shared with the inner
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(full_opt.state[a]["ema"], resumed_opt.state[b]["ema"])


def test_accelerate_scaler_skips_inf_step():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)  # sets up the state AcceleratedOptimizer reads
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    # what prepare() builds when a GradScaler is in use (on GPU with mixed_precision="fp16")
    opt = AcceleratedOptimizer(
        EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=DECAY), scaler=scaler
    )
    for i, (x, y) in enumerate(torch.utils.data.DataLoader(make_data(24), batch_size=8)):
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if i == 2:
            model[0].bias.grad[0] = float("nan")
            before = [(p.detach().clone(), opt.state[p]["ema"].clone()) for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        assert opt.step_was_skipped == (i == 2)
    for (w, s), p in zip(before, model.parameters()):
        assert torch.equal(w, p) and torch.equal(s, opt.state[p]["ema"])
    assert opt.optimizer._rt.counters.steps == 2


# ---------------------------------------------------------------------------------- transformers.Trainer


class _TinyRegressor(nn.Module):
    """A model transformers.Trainer can train: forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def _ema_of(optimizer) -> EMAOptimizer:
    """The EMAOptimizer inside Trainer.optimizer (an AcceleratedOptimizer once training started)."""
    while not isinstance(optimizer, EMAOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _hf_run(transformers, tmp_path, max_steps, resume=None):
    data = make_data(64)
    train = [{"x": x, "labels": y} for x, y in data]

    class EMATrainer(transformers.Trainer):
        seen = []

        def evaluate(self, *args, **kwargs):  # evaluate (and pick the best model) on the EMA weights
            with _ema_of(self.optimizer).swap_ema_weights():
                self.seen.append([p.detach().clone() for p in self.model.parameters()])
                return super().evaluate(*args, **kwargs)

    model = _TinyRegressor()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), decay=DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        logging_steps=100,
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = EMATrainer(
        model=model, args=args, train_dataset=train, eval_dataset=train[:16], optimizers=(opt, sched)
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer


def test_transformers_trainer_saves_resumes_and_evaluates_on_ema(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    full, full_opt, full_trainer = _hf_run(transformers, tmp_path / "full", max_steps=8)
    assert full_opt._rt.counters.steps == 8
    # Trainer's checkpoint (optimizer.pt) carries the shadows
    saved = torch.load(tmp_path / "full" / "checkpoint-8" / "optimizer.pt", weights_only=True)
    for i, p in enumerate(full.parameters()):
        assert torch.equal(saved["state"][i]["ema"], full_opt.state[p]["ema"])
    # evaluation ran on the EMA weights, the training weights came back
    assert all(
        torch.equal(a, full_opt.state[p]["ema"]) for a, p in zip(full_trainer.seen[-1], full.parameters())
    )
    assert not all(torch.equal(full_opt.state[p]["ema"], p) for p in full.parameters())

    # resume from checkpoint-4 of a fresh run: the same weights and shadows as the uninterrupted run
    resumed, resumed_opt, _ = _hf_run(
        transformers, tmp_path / "full", max_steps=8, resume=str(tmp_path / "full" / "checkpoint-4")
    )
    assert resumed_opt._rt.counters.steps == 8
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(full_opt.state[a]["ema"], resumed_opt.state[b]["ema"])
