"""The opt-in FA3-structured Gluon attention (zimage_kernels/attention_fa3.py).

Gluon kernels do not run under TRITON_INTERPRET (the dialect has explicit layouts, shared memory, mbarriers and
warp-specialized partitions the interpreter does not model), so correctness is checked on the GPU tier against the
float64 reference at Z-Image's shapes, in a child process with a timeout: a synchronization bug in the ping-pong
would hang, and must fail this test instead of the whole tier. The compiled-code facts (async wgmma, TMA,
setmaxnreg, no spills) are checked on the CPU tier by tests/test_aot_compile.py. Here on the CPU tier: the switch
is explicit and falls back to the default path wherever the kernel does not apply.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zimage_kernels import attention as attn
from zimage_kernels import reference

REPO = Path(__file__).resolve().parents[1]


def test_impl_switch_rejects_unknown_values(monkeypatch):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="default or fa3"):
        attn.attention(q, q, q, impl="fa4")
    monkeypatch.setenv(attn.IMPL_ENV, "flash")
    with pytest.raises(ValueError, match=attn.IMPL_ENV):
        attn.attention(q, q, q)


def test_fa3_is_opt_in_and_falls_back_off_hopper(monkeypatch):
    """On CPU (or any input the kernel does not take) impl='fa3' gives the default path's result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 3, 64).to(torch.bfloat16) for _ in range(3))
    kv_lens = torch.tensor([40, 17])
    want = reference.attention(q, k, v, kv_lens=kv_lens)
    assert torch.equal(attn.attention(q, k, v, kv_lens=kv_lens, impl="fa3"), want)
    monkeypatch.setenv(attn.IMPL_ENV, "fa3")
    out, lse = attn.attention(q, k, v, kv_lens=kv_lens, return_lse=True)
    want_out, want_lse = reference.attention_lse(q, k, v, kv_lens=kv_lens)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_fa3_supports_only_what_it_implements():
    from zimage_kernels import attention_fa3

    meta = dict(dtype=torch.bfloat16, device="meta")
    q = torch.empty(2, 64, 4, 3 * 64, **meta)[..., :64]  # head stride != D: not a [B, N, H·D] row view
    assert not attention_fa3._rows_view_ok(q)
    assert attention_fa3._rows_view_ok(torch.empty(2, 64, 4 * 128, **meta).unflatten(-1, (4, 128)))
    assert not attention_fa3._rows_view_ok(torch.empty(2, 64, 4, 128, **meta).transpose(1, 2))
    cpu = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    assert not attention_fa3.supports(cpu, cpu, cpu)  # CUDA sm_90 only


_CHILD = textwrap.dedent(
    """
    import torch
    from zimage_kernels import attention as attn, attention_fa3, reference
    from tests.test_kernels_gpu import _attention_inputs, _attention64, H, D
    from tests.tolerance import assert_close_to_ref

    if torch.cuda.get_device_capability()[0] != 9:
        print("SKIP: not sm_90")
        raise SystemExit(0)
    cases = [("real B=2 ragged", _attention_inputs(2))]
    cases.append(("real N=4128 (padded warpgroup exits early)", _attention_inputs(1, caps=(32,))))
    torch.manual_seed(1)
    small = [torch.randn(2, 300, 4 * 64, device="cuda").bfloat16().unflatten(-1, (4, 64)) for _ in range(3)]
    cases.append(("unaligned D=64, tail tile", (*small, torch.tensor([300, 131], dtype=torch.int32, device="cuda"))))
    cases.append(("empty sample", (*small, torch.tensor([0, 77], dtype=torch.int32, device="cuda"))))
    for name, (q, k, v, kv_lens) in cases:
        assert attention_fa3.supports(q, k, v, kv_lens), name
        out, lse = attn.attention(q, k, v, kv_lens=kv_lens, return_lse=True, impl="fa3")
        torch.cuda.synchronize()
        assert_close_to_ref(out, _attention64(q, k, v, kv_lens), reference.attention(q, k, v, kv_lens=kv_lens), name)
        _, want_lse = reference.attention_lse(q.double(), k.double(), v.double(), kv_lens=kv_lens)
        finite = torch.isfinite(want_lse)
        assert torch.equal(torch.isfinite(lse), finite), name
        torch.testing.assert_close(lse[finite].double(), want_lse[finite], rtol=0, atol=1e-3)
        print("ok", name)
    """
)


@pytest.mark.gpu
def test_fa3_bf16_against_float64_at_real_shapes():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, cwd=REPO, timeout=150
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the FA3 kernel did not finish within 150 s (a hang in its barrier protocol?)")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if "SKIP" in res.stdout:
        pytest.skip(res.stdout.strip())
    assert res.stdout.count("ok ") == 4, res.stdout
