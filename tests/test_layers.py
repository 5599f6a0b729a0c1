"""lvae.layers: the inference-mode dense layer equals the module's forward."""

import torch

import lvae
from helpers import small_config



def test_inference_mode_dense_matches_forward():
    torch.manual_seed(0)
    model = lvae.build_model(small_config())
    x = (torch.rand(40, 30) < 0.4).float()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        a = model.upward(x)
    with torch.inference_mode():
        b = model.upward(x)
    for (ma, va), (mb, vb) in zip(a, b):
        torch.testing.assert_close(mb, ma, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)
