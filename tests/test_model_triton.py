"""The small models' forward on the Triton ops against the same forward on the torch ops (Triton interpreter).

Rule: ``max|out_triton - out64| <= 2 * max|out_torch - out64| + floor`` over all outputs, where out64 is the torch-op
forward in float64 and out_torch the torch-op forward in the test dtype (tests/tolerance.py).
"""

import pytest
import torch

from tests.helpers import SMALL_CONFIGS, diffusers_transformer, flat, inputs
from tests.tolerance import assert_close_to_ref
from zimage_core import ZImageTransformer
from zimage_kernels import attention, gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm_modulate, swiglu

KERNEL_MODULES = (attention, gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm_modulate, swiglu)


def _run(model, x, t, caps, dtype):
    with torch.no_grad():
        return flat(model([xi.to(dtype) for xi in x], t.to(dtype), [c.to(dtype) for c in caps])).to(dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["ragged", "cfg"])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_triton_forward_within_twice_the_torch_error(name, kind, dtype, monkeypatch):
    launched = set()
    for mod in KERNEL_MODULES:
        real = mod._launch
        monkeypatch.setattr(mod, "_launch", lambda *a, _r=real, _n=mod.__name__, **k: launched.add(_n) or _r(*a, **k))

    model64 = ZImageTransformer.from_diffusers(diffusers_transformer(name, dtype=torch.float64), kernel_backend="torch")
    model = ZImageTransformer.from_diffusers(diffusers_transformer(name, dtype=dtype), kernel_backend="torch")
    x, t, caps = inputs(SMALL_CONFIGS[name], kind)
    exact = _run(model64, x, t, caps, torch.float64)
    eager = _run(model, x, t, caps, dtype)
    assert not launched
    fused = _run(model.set_kernel_backend("triton"), x, t, caps, dtype)
    assert_close_to_ref(fused, exact, eager, f"{name}/{kind}/{dtype}")
    # Every fused op ran its kernel, not the reference fallback (all small configs are supported shapes).
    assert launched == {m.__name__ for m in KERNEL_MODULES}, launched


@pytest.mark.interpret
def test_env_var_selects_triton(monkeypatch):
    """ZIMAGE_KERNELS=triton with no explicit backend: the forward runs the kernels."""
    calls = []
    real = attention._launch
    monkeypatch.setattr(attention, "_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = ZImageTransformer.from_diffusers(diffusers_transformer("hd32"))
    x, t, caps = inputs(SMALL_CONFIGS["hd32"], "single")
    monkeypatch.setenv("ZIMAGE_KERNELS", "torch")
    _run(model, x, t, caps, torch.float32)
    assert not calls
    monkeypatch.setenv("ZIMAGE_KERNELS", "triton")
    _run(model, x, t, caps, torch.float32)
    assert calls
