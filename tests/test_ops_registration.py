"""The kernels as ``torch.library`` custom ops: schemas, fake implementations, opcheck, torch.compile tracing.

cpu tier: registration and fake-tensor shape propagation (CPU and CUDA fakes; no launch).
interpret tier: ``torch.library.opcheck`` (runs the real kernels) and ``torch.compile(fullgraph=True)`` with the
``aot_eager`` backend (no C++ compiler needed) through the public functions.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import zimage_kernels.triton_ops  # noqa: F401  (registers torch.ops.zimage.*)
from zimage_kernels import reference
from zimage_kernels.triton_ops import TRITON_OPS

OPS = ("attention", "qk_norm_rope", "rms_norm_modulate", "gated_residual", "swiglu", "layer_norm_modulate")
# FP8 ops: references in zimage_kernels.fp8, no custom-op registration yet (docs/fp8.md)
FP8_OPS = ("rms_norm_modulate_fp8", "swiglu_fp8", "quantize_rows", "fp8_linear")


def _args(device="cpu", dtype=torch.float32, B=2, N=24, H=2, D=32):
    """One argument tuple per op (positional, as the custom op takes them), model-like layouts."""
    C = H * D

    def rn(*s):  # created on the target device directly, so this also works inside FakeTensorMode
        return torch.randn(*s, dtype=dtype, device=device)

    q = rn(B, N, C).unflatten(-1, (H, D))
    k = rn(B, N, C).unflatten(-1, (H, D))
    v = rn(B, N, C).unflatten(-1, (H, D))
    freqs = torch.polar(*(torch.rand(B, N, D // 2, device=device) for _ in range(2)))
    x, y, w, s = rn(B, N, C), rn(B, N, C), rn(C) + 1, rn(B, 1, C)
    return {
        "attention": (q, k, v, torch.full((B,), N - 5, dtype=torch.int32, device=device), None),
        "qk_norm_rope": (q, k, rn(D) + 1, rn(D) + 1, freqs, 1e-5),
        "rms_norm_modulate": (x, w, s, 1e-5),
        "gated_residual": (x, y, w, s, 1e-5),
        "swiglu": (x, y),
        "layer_norm_modulate": (x, s, 1e-6),
    }


def test_ops_are_registered_with_schemas():
    for name in OPS:
        op = getattr(torch.ops.zimage, name)
        schema = str(op.default._schema)
        assert schema.startswith(f"zimage::{name}("), schema
        assert "!" not in schema  # no argument is mutated


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fake_implementations_propagate_shapes(device):
    """Under FakeTensorMode (what torch.compile traces with) every op yields outputs of the right shape/dtype/device,
    without running a kernel; CUDA fakes work on a CPU-only host."""
    with FakeTensorMode():
        for dtype in (torch.float32, torch.bfloat16):
            args = _args(device, dtype)
            for name in OPS:
                out = getattr(torch.ops.zimage, name)(*args[name])
                outs = out if isinstance(out, tuple) else (out,)
                like = args[name][:2] if name == "qk_norm_rope" else args[name][:1]
                for o, ref in zip(outs, like):
                    assert o.shape == ref.shape and o.dtype == dtype and o.device.type == device, name
                    assert o.is_contiguous(), name


@pytest.mark.interpret
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.zimage, name), _args()[name])


@pytest.mark.interpret
def test_compiled_block_matches_eager():
    """A block-shaped function over all six ops compiles with fullgraph=True (the ops stay opaque custom ops) and
    gives the same result as eager Triton."""
    a = _args()

    def block(q, k, v, kv_lens, qw, kw, freqs, x, y, w, s):
        ops = TRITON_OPS
        q, k = ops.qk_norm_rope(q, k, qw, kw, freqs, 1e-5)
        o = ops.attention(q, k, v, kv_lens=kv_lens).flatten(2)
        h = ops.rms_norm_modulate(x, w, s, 1e-5)
        x = ops.gated_residual(x, o + h, w, s, 1e-5)
        x = x + ops.swiglu(x, y)
        return ops.layer_norm_modulate(x, s, 1e-6)

    q, k, v, kv_lens, _ = a["attention"]
    _, _, qw, kw, freqs, _ = a["qk_norm_rope"]
    x, y, w, s, _ = a["gated_residual"]
    args = (q, k, v, kv_lens, qw, kw, freqs, x, y, w, s)
    eager = block(*args)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(*args)
    assert torch.equal(compiled, eager)
    # ...and the compiled graph really calls our ops (not a traced-through reference).
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    torch.compile(block, backend=counter, fullgraph=True)(*args)
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {f"zimage.{name}.default" for name in OPS} <= targets, targets


def test_reference_and_triton_ops_cover_the_same_names():
    assert {f for f in TRITON_OPS.__dataclass_fields__ if f != "name"} == set(OPS) | set(FP8_OPS)
    for name in OPS:
        assert callable(getattr(reference, name))
    from zimage_kernels import fp8

    for name in FP8_OPS:
        assert callable(getattr(fp8, name))
