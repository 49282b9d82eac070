"""EMAOptimizer with PEFT adapters (LoRA, DoRA, modules_to_save, a 4-bit base).

The optimizer is built from the trainable params only, so the EMA covers exactly the adapters.
Shadows are checked against the float64 reference in tests/reference.py; merged exports against
a float64 forward written from the LoRA/DoRA formulas. Skips cleanly without
``pip install "ema_optim[peft]"``; the 4-bit test also needs bitsandbytes
(``ema_optim[qlora]``). CPU, a few seconds.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ema_optim import EMAOptimizer, schedules

from .reference import reference_shadows

peft = pytest.importorskip("peft")
from peft import (  # noqa: E402
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

DECAY = 0.8
STEPS = 6
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["0", "2"]}
SCALE = LORA["lora_alpha"] / LORA["r"]


def pretrained(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The "pretrained" base: rebuilt identically from its seed, as a hub download would be."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def lora_model(base: nn.Module | None = None, adapter_seed: int = 1, **config) -> nn.Module:
    base = pretrained() if base is None else base
    torch.manual_seed(adapter_seed)
    autocast = config.pop("autocast_adapter_dtype", True)
    return get_peft_model(base, LoraConfig(**{**LORA, **config}), autocast_adapter_dtype=autocast)


def batches(n: int = STEPS, dtype: torch.dtype = torch.float32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g).to(dtype), torch.randn(8, 4, generator=g)) for _ in range(n)]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def make_opt(model: nn.Module, **kwargs) -> EMAOptimizer:
    kwargs.setdefault("decay", DECAY)
    return EMAOptimizer(
        torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-2), **kwargs
    )


def train(model, opt, data, params=None) -> tuple[dict, dict]:
    """Run the steps; return the float64 weights of ``params`` before the first step and after each."""
    params = trainable(model) if params is None else params
    initial = {n: p.detach().double().clone() for n, p in params.items()}
    history: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for x, y in data:
        nn.functional.mse_loss(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad()
        for n, p in params.items():
            history[n].append(p.detach().double().clone())
    return initial, history


def expected_shadows(initial, history, decay=DECAY) -> dict[str, torch.Tensor]:
    return {n: reference_shadows(initial[n], history[n], decay)[-1] for n in initial}


def assert_shadows(opt, params, expected, rtol=1e-5, atol=1e-6):
    assert set(params) == set(expected)
    for n, p in params.items():
        torch.testing.assert_close(opt.state[p]["ema"].double(), expected[n], rtol=rtol, atol=atol, msg=n)


def lora_forward_f64(x, base: nn.Sequential, adapters: dict[str, torch.Tensor], dora=False):
    """x -> Linear'(0) -> tanh -> Linear'(2) in float64, W' = W + s B A (DoRA: m * W' / ||W'|| per row)."""
    h = x.double()
    for i in (0, 2):
        w, b = base[i].weight.double(), base[i].bias.double()
        key = f"base_model.model.{i}.lora_%s.default.weight"
        w = w + SCALE * adapters[key % "B"] @ adapters[key % "A"]
        if dora:
            w = (
                adapters[f"base_model.model.{i}.lora_magnitude_vector.default.weight"][:, None]
                * w
                / w.norm(dim=1, keepdim=True)
            )
        h = h @ w.T + b
        h = torch.tanh(h) if i == 0 else h
    return h


def ema_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter state dict, cloned: its tensors are views of the params, restored on the swap's exit."""
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_plain(module: nn.Module):
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in module.modules())


# ------------------------------------------------------------------------------------- LoRA


def test_only_the_adapters_get_shadows():
    model = lora_model()
    base, params = frozen(model), trainable(model)
    assert sum(p.numel() for p in params.values()) == 336
    assert sum(p.numel() for p in model.parameters()) == 1012
    opt = make_opt(model)
    train(model, opt, batches())
    shadows = [opt.state[p]["ema"] for p in params.values()]
    assert len(opt.state) == len(opt.state_dict()["state"]) == 4
    assert sum(s.numel() * s.element_size() for s in shadows) == 1344  # 336 float32 shadows
    assert all(p not in opt.state for p in model.parameters() if not p.requires_grad)
    with opt.swap_ema_weights():
        after = frozen(model)
    assert base.keys() == after.keys() and len(base) == 4
    assert all(torch.equal(base[n], after[n]) for n in base)  # frozen base untouched, also in the swap


def test_shadows_follow_the_float64_reference():
    model = lora_model()
    opt = make_opt(model)
    params = trainable(model)
    initial = {n: p.detach().double().clone() for n, p in params.items()}
    weights: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for step in range(STEPS):  # the shadows match after every step, not only at the end
        for n, w in train(model, opt, batches(1, seed=10 + step))[1].items():
            weights[n] += w
        assert_shadows(opt, params, expected_shadows(initial, weights))


def test_swap_and_merged_export_match_the_ema_adapters():
    model = lora_model()
    opt = make_opt(model)
    ema = expected_shadows(*train(model, opt, batches()))
    training = {n: p.detach().clone() for n, p in trainable(model).items()}
    x = batches(1, seed=9)[0][0]
    with torch.no_grad(), opt.swap_ema_weights():
        out = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
    assert_plain(merged)
    assert isinstance(merged, nn.Sequential)
    reference = lora_forward_f64(x, pretrained(), ema)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-6)
    for i in (0, 2):
        w = pretrained()[i].weight.double()
        key = f"base_model.model.{i}.lora_%s.default.weight"
        expected = w + SCALE * ema[key % "B"] @ ema[key % "A"]
        torch.testing.assert_close(merged[i].weight.double(), expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, training[n]) for n, p in trainable(model).items())  # back, bit for bit
    assert not model.base_model.model[0].merged  # the live model was not merged


def test_export_only_the_ema_adapters(tmp_path):
    from safetensors.torch import load_file

    model = lora_model()
    opt = make_opt(model)
    ema = expected_shadows(*train(model, opt, batches()))
    x = batches(1, seed=9)[0][0]
    with torch.no_grad(), opt.swap_ema_weights():
        views = get_peft_model_state_dict(model)
        adapters = ema_adapters(model)
        model.save_pretrained(tmp_path)
        out = model(x)
    # the state dict holds views of the params: after the block they show the training weights again
    assert all(torch.equal(views[k], p) for k, p in zip(views, trainable(model).values()))
    assert len(adapters) == 4 and all("lora_" in k for k in adapters)
    for k, v in adapters.items():
        torch.testing.assert_close(
            v.double(), ema[k.replace(".weight", ".default.weight")], rtol=1e-5, atol=1e-6
        )
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == adapters.keys() and all(torch.equal(saved[k], adapters[k]) for k in saved)
    reloaded = PeftModel.from_pretrained(pretrained(), tmp_path)  # pretrained base + the EMA adapters
    with torch.no_grad():
        assert torch.equal(reloaded(x), out)


def test_resume_is_exact_with_the_base_reloaded_from_pretrained(tmp_path):
    data = batches(2 * STEPS)
    full = lora_model()
    opt_full = make_opt(full, decay=schedules.warmup(max_decay=0.95))
    train(full, opt_full, data)

    half = lora_model()
    opt_half = make_opt(half, decay=schedules.warmup(max_decay=0.95))
    train(half, opt_half, data[:STEPS])
    torch.save(
        {"adapters": get_peft_model_state_dict(half), "opt": opt_half.state_dict()}, tmp_path / "ckpt.pt"
    )

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = lora_model(adapter_seed=7)  # fresh adapter init, base rebuilt from the pretrained source
    assert not torch.equal(
        resumed.base_model.model[0].lora_A.default.weight, half.base_model.model[0].lora_A.default.weight
    )
    set_peft_model_state_dict(resumed, ckpt["adapters"])
    opt_resumed = make_opt(resumed, decay=schedules.warmup(max_decay=0.95))
    opt_resumed.load_state_dict(ckpt["opt"])
    train(resumed, opt_resumed, data[STEPS:])
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
        if a.requires_grad:
            assert torch.equal(opt_full.state[a]["ema"], opt_resumed.state[b]["ema"]), name


@pytest.mark.parametrize("train_both", [True, False])
def test_a_second_adapter_added_mid_training_gets_shadows(train_both):
    decay = schedules.linear(0.5, 0.95, 8)  # a schedule, so that the shared counter is checked too
    model = lora_model()
    opt = make_opt(model, decay=decay)
    first = trainable(model)
    initial, history = train(model, opt, batches(STEPS))

    model.add_adapter("second", LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    # both train from now on, or only the second one (the first is frozen but stays in the optimizer)
    model.base_model.set_adapter(["default", "second"] if train_both else "second")
    second = {n: p for n, p in trainable(model).items() if ".second." in n}
    assert len(second) == 4 and all(p not in opt.state for p in second.values())
    opt.add_param_group({"params": list(second.values())})
    initial2, history2 = train(model, opt, batches(STEPS, seed=5), params={**first, **second})

    for n in first:
        assert train_both or all(torch.equal(w, initial2[n]) for w in history2[n])  # frozen: constant
        history[n] += history2[n]
    assert_shadows(opt, first, expected_shadows(initial, history, decay))
    late = {n: initial2[n] for n in second}  # weights at the next step, then the same counter as the rest
    assert_shadows(opt, second, expected_shadows(late, history2, lambda t: decay(t + STEPS)))
    x = batches(1, seed=9)[0][0]
    with torch.no_grad(), opt.swap_ema_weights():
        torch.testing.assert_close(copy.deepcopy(model).merge_and_unload()(x), model(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- dtypes


def test_bf16_base_with_fp32_adapters():
    model = lora_model(pretrained(torch.bfloat16))  # peft keeps the adapters in float32 by default
    params = trainable(model)
    assert {p.dtype for p in params.values()} == {torch.float32}
    base = frozen(model)
    opt = make_opt(model)
    ema = expected_shadows(*train(model, opt, batches(dtype=torch.bfloat16)))
    assert_shadows(opt, params, ema)
    assert all(opt.state[p]["ema"].dtype == torch.float32 for p in params.values())
    assert all(torch.equal(v, frozen(model)[n]) and v.dtype == torch.bfloat16 for n, v in base.items())
    x = batches(1, dtype=torch.bfloat16, seed=9)[0][0]
    with torch.no_grad(), opt.swap_ema_weights():
        out = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
    assert merged[0].weight.dtype == torch.bfloat16
    reference = lora_forward_f64(x, pretrained(torch.bfloat16), ema)
    torch.testing.assert_close(out.double(), reference, rtol=2e-2, atol=2e-2)  # bf16 activations
    with torch.no_grad():
        torch.testing.assert_close(merged(x).double(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("ema_dtype", [None, torch.float32])
def test_bf16_adapters_keep_fp32_shadows(ema_dtype):
    model = lora_model(pretrained(torch.bfloat16), autocast_adapter_dtype=False)
    params = trainable(model)
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    opt = make_opt(model, ema_dtype=ema_dtype)
    ema = expected_shadows(*train(model, opt, batches(dtype=torch.bfloat16)))
    assert_shadows(opt, params, ema)  # float32 accuracy: a bf16 shadow would be off by ~1e-3
    assert any(not torch.equal(v.bfloat16().double(), v) for v in ema.values())
    shadows = [opt.state[p]["ema"] for p in params.values()]
    assert {s.dtype for s in shadows} == {torch.float32}
    assert sum(s.numel() * s.element_size() for s in shadows) == 4 * 336
    fresh = make_opt(model, ema_dtype=ema_dtype)
    fresh.load_state_dict(opt.state_dict())
    assert all(fresh.state[p]["ema"].dtype == torch.float32 for p in params.values())
    training = {n: p.detach().clone() for n, p in params.items()}
    before = [s.clone() for s in shadows]  # inside the block the shadow slots hold swap bookkeeping
    with opt.swap_ema_weights():  # the params get the fp32 EMA rounded to bf16
        for p, s in zip(params.values(), before):
            torch.testing.assert_close(p.float(), s, rtol=2**-8, atol=1e-30)
    assert all(torch.equal(p, training[n]) for n, p in params.items())


# ------------------------------------------------------------------ DoRA, modules_to_save, 4-bit


def test_dora_magnitude_vectors_get_shadows_and_merge():
    model = lora_model(use_dora=True)
    params = trainable(model)
    magnitudes = [n for n in params if "lora_magnitude_vector" in n]
    assert len(params) == 6 and len(magnitudes) == 2
    opt = make_opt(model)
    ema = expected_shadows(*train(model, opt, batches()))
    assert_shadows(opt, params, ema)
    x = batches(1, seed=9)[0][0]
    with torch.no_grad(), opt.swap_ema_weights():
        out = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
    assert_plain(merged)
    torch.testing.assert_close(
        out.double(), lora_forward_f64(x, pretrained(), ema, dora=True), rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-6)


def test_modules_to_save_copy_is_averaged_and_merged():
    model = lora_model(target_modules=["0"], modules_to_save=["2"])
    params = trainable(model)
    assert (
        sorted(n.rsplit(".", 2)[0] for n in params if "modules_to_save" in n)
        == ["base_model.model.2.modules_to_save"] * 2
    )
    original = frozen(model)
    assert any("original_module" in n for n in original)
    opt = make_opt(model)
    ema = expected_shadows(*train(model, opt, batches()))
    assert_shadows(opt, params, ema)
    x = batches(1, seed=9)[0][0]
    with torch.no_grad(), opt.swap_ema_weights():
        out = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
        exported = ema_adapters(model)
    assert all(torch.equal(v, frozen(model)[n]) for n, v in original.items())
    assert_plain(merged)
    for name in ("weight", "bias"):
        expected = ema[f"base_model.model.2.modules_to_save.default.{name}"]
        torch.testing.assert_close(getattr(merged[2], name).double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(exported[f"base_model.model.2.{name}"], getattr(merged[2], name))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-6)


def quantized_base() -> nn.Sequential:
    bnb = pytest.importorskip("bitsandbytes")
    base = pretrained()
    layer = bnb.nn.Linear4bit(16, 32, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(base[0].weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(base[0].bias.data.clone(), requires_grad=False)
    base[0] = layer.to("cpu")  # quantizes
    base.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; peft dispatches on it
    return base


def test_4bit_base_keeps_shadows_for_the_adapters_only():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lora_model(quantized_base())
    assert type(model.base_model.model[0]).__name__ == "Linear4bit"  # peft's QLoRA layer
    params = trainable(model)
    assert len(params) == 4
    base = frozen(model)
    assert base["base_model.model.0.base_layer.weight"].dtype == torch.uint8
    opt = make_opt(model)
    ema = expected_shadows(*train(model, opt, batches()))
    assert_shadows(opt, params, ema)
    assert len(opt.state) == 4 and all(torch.equal(v, frozen(model)[n]) for n, v in base.items())
    x = batches(1, seed=9)[0][0]
    with torch.no_grad(), opt.swap_ema_weights():
        out = model(x)
        adapters = ema_adapters(model)
    dequantized = pretrained()
    layer = model.base_model.model[0].base_layer
    dequantized[0].weight.data = bnb_dequantize(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(out.double(), lora_forward_f64(x, dequantized, ema), rtol=1e-5, atol=1e-5)
    full = lora_model()  # export: the EMA adapters on the full-precision base, merged without requantizing
    set_peft_model_state_dict(full, adapters)
    with torch.no_grad():
        merged = full.merge_and_unload()
        torch.testing.assert_close(
            merged(x).double(), lora_forward_f64(x, pretrained(), ema), rtol=1e-5, atol=1e-5
        )


def bnb_dequantize(weight, quant_state):
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight, quant_state)
