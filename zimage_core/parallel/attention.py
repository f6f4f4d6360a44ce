"""Sequence-parallel attention ops with the signature of ``zimage_kernels.reference.attention``.

Each rank holds a contiguous shard ``[B, n, H, D]`` of the (padded) unified sequence, ``N = P·n`` tokens in all.
``kv_lens`` are the global valid key lengths (keys ``j >= kv_lens[b]`` are ignored), exactly as in one process.

Ulysses (all-to-all)::

    q, k, v [B, n, H, D] ─ one all_to_all ─► [B, N, h_r, D]   (all tokens, this rank's heads)
    attention over the whole sequence with the wrapped op (torch SDPA or our Triton kernel)
    out [B, N, h_r, D]   ─ one all_to_all ─► [B, n, H, D]

  Heads that the degree does not divide: ``uneven`` gives ranks ⌈H/P⌉ or ⌊H/P⌋ heads (all_to_all_single with split
  sizes); ``pad`` appends zero heads up to a multiple of P (equal splits, more bytes and FLOPs, dropped after).

Ring: queries stay; the key/value shards travel around the ring (``batch_isend_irecv`` to rank + 1, overlapped with
the block in flight); blocks are merged with their log-sum-exp (online softmax), in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch >= 2.13 renamed all_gather_into_tensor (same signature); keep older torch working
all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def head_splits(n_heads: int, degree: int, mode: str = "uneven") -> tuple[int, list[int]]:
    """(heads after padding, heads per rank). ``uneven``: the first H mod P ranks take one head more."""
    if mode == "pad":
        per = -(-n_heads // degree)
        return per * degree, [per] * degree
    if n_heads < degree:
        raise ValueError(f"Ulysses degree {degree} exceeds the {n_heads} attention heads: use heads=pad or fewer ranks")
    base, extra = divmod(n_heads, degree)
    return n_heads, [base + (r < extra) for r in range(degree)]


def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, group) -> None:
    even = len(set(out_splits)) == 1 and len(set(in_splits)) == 1
    dist.all_to_all_single(out, inp, None if even else list(out_splits), None if even else list(in_splits), group=group)


def seq_to_heads(x: torch.Tensor, splits: list[int], group, rank: int) -> torch.Tensor:
    """[S, B, n, H, D] (S stacked tensors, H = Σ splits) -> [S, B, P·n, h_rank, D]."""
    S, B, n, H, D = x.shape
    P, h = len(splits), splits[rank]
    send = x.permute(3, 0, 1, 2, 4).contiguous()  # [H, S, B, n, D]: rank r's heads are a contiguous block
    recv = x.new_empty(P * h, S, B, n, D)
    _a2a(recv, send, [h] * P, splits, group)
    # recv[p·h + j] = source rank p's token shard of my head j
    return recv.view(P, h, S, B, n, D).permute(2, 3, 0, 4, 1, 5).reshape(S, B, P * n, h, D)


def heads_to_seq(y: torch.Tensor, splits: list[int], group, rank: int) -> torch.Tensor:
    """[B, P·n, h_rank, D] -> [B, n, H, D] (the inverse of :func:`seq_to_heads` for one tensor)."""
    B, N, h, D = y.shape
    P = len(splits)
    n = N // P
    send = y.reshape(B, P, n, h, D).permute(1, 3, 0, 2, 4).contiguous()  # [P, h, B, n, D]
    recv = y.new_empty(sum(splits), B, n, D)
    _a2a(recv, send.view(P * h, B, n, D), splits, [h] * P, group)
    return recv.permute(1, 2, 0, 3)  # [B, n, H, D]


class UlyssesAttention:
    """All-to-all attention around ``inner`` (any op with the reference attention's signature)."""

    def __init__(self, inner: Callable, group, rank: int, degree: int, heads: str = "uneven"):
        self.inner, self.group, self.rank, self.degree, self.heads = inner, group, rank, degree, heads

    def __call__(self, q, k, v, *, kv_lens=None, scale=None):
        H = q.shape[2]
        padded, splits = head_splits(H, self.degree, self.heads)
        qkv = torch.stack([q, k, v])  # [3, B, n, H, D]: one all-to-all for the three
        if padded > H:
            qkv = F.pad(qkv, (0, 0, 0, padded - H))  # zero heads: uniform softmax over zero values -> zero output
        q, k, v = seq_to_heads(qkv, splits, self.group, self.rank).unbind(0)
        out = self.inner(q, k, v, kv_lens=kv_lens, scale=scale)  # [B, N, h_rank, D]
        out = heads_to_seq(out.contiguous(), splits, self.group, self.rank)
        return out[:, :, :H] if padded > H else out


def _block_attention(q, k, v, scale, key_valid):
    """fp32 (unnormalised out, row max, row sum) of one key block. q [B, H, n, D]; key_valid [B, m] bool or None."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e30)  # a fully masked block has m = -inf: keep it finite
    p = torch.exp(s - m)
    return torch.einsum("bhqk,bhkd->bhqd", p, v), m, p.sum(-1, keepdim=True)


class RingAttention:
    """Ring attention with log-sum-exp merging (torch math, fp32 accumulation)."""

    def __init__(self, group, rank: int, degree: int):
        self.group, self.rank, self.degree = group, rank, degree
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(degree))

    def __call__(self, q, k, v, *, kv_lens=None, scale=None):
        B, n, H, D = q.shape
        P, r = self.degree, self.rank
        scale = D**-0.5 if scale is None else scale
        qf = q.permute(0, 2, 1, 3).float()  # [B, H, n, D]
        kv = torch.stack([k, v]).permute(0, 1, 3, 2, 4).float().contiguous()  # [2, B, H, n, D]
        acc = torch.zeros_like(qf)
        m_run = torch.full((B, H, n, 1), -1e30, dtype=torch.float32, device=q.device)
        l_run = torch.zeros_like(m_run)
        nxt, prv = self.ranks[(r + 1) % P], self.ranks[(r - 1) % P]
        for step in range(P):
            reqs = []
            if step < P - 1:  # start moving this block to the next rank while it is used here
                recv = torch.empty_like(kv)
                ops = [dist.P2POp(dist.isend, kv, nxt, self.group), dist.P2POp(dist.irecv, recv, prv, self.group)]
                reqs = dist.batch_isend_irecv(ops)
            src = (r - step) % P  # whose keys this block is
            valid = None
            if kv_lens is not None:
                pos = torch.arange(src * n, (src + 1) * n, device=q.device)
                valid = pos[None, :] < kv_lens.to(q.device)[:, None]
            o, m, ls = _block_attention(qf, kv[0], kv[1], scale, valid)
            m_new = torch.maximum(m_run, m)
            a, b = torch.exp(m_run - m_new), torch.exp(m - m_new)
            acc = acc * a + o * b
            l_run = l_run * a + ls * b
            m_run = m_new
            for req in reqs:
                req.wait()
            if step < P - 1:
                kv = recv
        return (acc / l_run).permute(0, 2, 1, 3).to(q.dtype)  # [B, n, H, D]
