"""Attention's log-sum-exp output (what ring attention needs) against float64 computed here, under the interpreter.

The reference values are computed in this file in float64 from the definition (``logsumexp`` of the scaled scores
over the valid keys), not by the code under test. The merge test is the use ring attention makes of it: two
attentions over disjoint key halves, combined with their LSEs, must equal attention over all keys.
"""

import pytest
import torch

from zimage_kernels import attention as attn
from zimage_kernels import reference

PATHS = ["plain", "tma"]


def _lse64(q, k, kv_lens, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if kv_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < kv_lens[:, None].long()
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.logsumexp(s, dim=-1)


def _inputs(B, N, H, D, n_kv=None, dtype=torch.float32):
    n_kv = N if n_kv is None else n_kv
    q = torch.randn(B, N, H * D).to(dtype).unflatten(-1, (H, D))
    k = (torch.randn(B, n_kv, H * D) * 2).to(dtype).unflatten(-1, (H, D))
    v = torch.randn(B, n_kv, H * D).to(dtype).unflatten(-1, (H, D))
    return q, k, v


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lse_matches_float64_with_ragged_and_empty_keys(path, dtype):
    q, k, v = _inputs(3, 100, 2, 64, dtype=dtype)
    lens = torch.tensor([100, 45, 0], dtype=torch.int32)
    out, lse = attn._launch(q, k, v, lens, None, path=path, lse=True)
    want = _lse64(q, k, lens, 64**-0.5)
    assert lse.shape == (3, 2, 100) and lse.dtype == torch.float32
    assert torch.isneginf(lse[2]).all()  # no valid key: -inf (weight 0 when merging)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16 inputs are exact in fp32; only the fp32 sum differs
    torch.testing.assert_close(lse[:2].double(), want[:2], rtol=0, atol=tol)
    torch.testing.assert_close(out, attn._launch(q, k, v, lens, None, path=path))  # same output as without lse


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
def test_two_key_halves_merged_by_lse_equal_full_attention(path):
    q, k, v = _inputs(1, 96, 2, 32, n_kv=160)
    scale = 0.2
    o1, l1 = attn._launch(q, k[:, :70], v[:, :70], None, scale, path=path, lse=True)
    o2, l2 = attn._launch(q, k[:, 70:], v[:, 70:], None, scale, path=path, lse=True)
    lse = torch.logaddexp(l1.double(), l2.double())  # [B, H, N]
    w1 = torch.exp(l1.double() - lse).transpose(1, 2)[..., None]  # [B, N, H, 1]
    w2 = torch.exp(l2.double() - lse).transpose(1, 2)[..., None]
    merged = w1 * o1.double() + w2 * o2.double()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    full = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-5)


def test_public_api_falls_back_to_the_reference_with_lse():
    """Inputs the kernels do not take (bf16 on CPU) go to reference.attention_lse, same contract."""
    q, k, v = _inputs(2, 20, 2, 16, dtype=torch.bfloat16)
    lens = torch.tensor([20, 7])
    out, lse = attn.attention(q, k, v, kv_lens=lens, return_lse=True)
    ref_out, _ = reference.attention_lse(q, k, v, kv_lens=lens)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), _lse64(q, k, lens, 16**-0.5), rtol=0, atol=1e-4)


@pytest.mark.interpret
def test_lse_custom_op_opcheck_and_fake():
    """``torch.ops.zimage.attention_lse``: opcheck (schema, fake vs real, autograd registration) and CUDA fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _inputs(2, 24, 2, 32)
    lens = torch.tensor([24, 19], dtype=torch.int32)
    torch.library.opcheck(torch.ops.zimage.attention_lse, (q, k, v, lens, None))
    with FakeTensorMode():
        qf = torch.empty(2, 24, 2, 32, device="cuda", dtype=torch.bfloat16)
        out, lse = torch.ops.zimage.attention_lse(qf, qf, qf, None, None)
        assert out.shape == qf.shape and lse.shape == (2, 2, 24) and lse.dtype == torch.float32
