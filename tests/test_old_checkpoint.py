"""A checkpoint saved by ema_optim 0.1 loads into this version and resumes bit for bit."""

from pathlib import Path

import torch

from tests.data.make_v01_checkpoint import build, train

DATA = Path(__file__).parent / "data" / "v0.1_checkpoint.pt"


def test_v01_checkpoint_resumes_bit_for_bit():
    saved = torch.load(DATA, weights_only=True)
    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    g = torch.Generator()
    g.set_state(saved["generator"])
    train(model, opt, 4, g)
    params = list(model.parameters())
    for p, want in zip(params, saved["expected_params"]):
        assert p.dtype == want.dtype and torch.equal(p, want)
    for p, want in zip(params, saved["expected_shadows"]):
        shadow = opt.state[p]["ema"]
        assert shadow.dtype == want.dtype == torch.float32 and torch.equal(shadow, want)
