"""The sequence-parallel StackHook: the outermost hook around the main layers.

``around_stack``: pad the unified sequence ``[B, N, dim]`` to a multiple of the degree P (Z-Image's image and
caption lengths are multiples of 32, so this is a no-op for P in 2, 4, 8), keep this rank's contiguous shard of
the tokens and of the RoPE table, swap ``inp.ops.attention`` for the Ulysses or ring op, run every inner hook and
layer on the shard, then all-gather the shards back into ``[B, N, dim]``. Everything in a layer except attention
acts token by token, so the shards need no other communication. ``kv_lens`` stay global (the attention ops see
global key positions); padding rows added here are masked as keys. The model runs the noise refiner (image tokens
only, before the caption is joined) through this hook too (``wraps_refiner``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..hooks import StackHook
from .attention import RingAttention, UlyssesAttention, all_gather_tensor


class SequenceParallelHook(StackHook):
    wraps_refiner = True  # the model also runs the noise refiner (image tokens only) through this hook

    def __init__(self, group, degree: int, mode: str = "ulysses", heads: str = "uneven"):
        if mode not in ("ulysses", "ring"):
            raise ValueError(f"sequence-parallel mode must be 'ulysses' or 'ring', got {mode!r}")
        self.group, self.degree, self.mode, self.heads = group, degree, mode, heads
        self.rank = dist.get_rank(group)

    def shard(self, hidden: torch.Tensor, inp):
        """(local hidden [B, n, dim], local BlockInputs, global length N)."""
        B, N, _ = hidden.shape
        P, r = self.degree, self.rank
        pad = (-N) % P
        kv_lens, freqs = inp.kv_lens, inp.freqs_cis
        if pad:
            if kv_lens is None:
                kv_lens = torch.full((B,), N, dtype=torch.int32, device=hidden.device)
            hidden = F.pad(hidden, (0, 0, 0, pad))
            freqs = torch.cat([freqs, freqs.new_ones(B, pad, freqs.shape[-1])], dim=1)
        n = (N + pad) // P
        if self.mode == "ulysses":
            attn = UlyssesAttention(inp.ops.attention, self.group, r, P, self.heads)
        else:
            attn = RingAttention(self.group, r, P)
        local = dataclasses.replace(
            inp,
            ops=dataclasses.replace(inp.ops, attention=attn),
            kv_lens=kv_lens,
            freqs_cis=freqs[:, r * n : (r + 1) * n].contiguous(),
        )
        return hidden[:, r * n : (r + 1) * n].contiguous(), local, N

    def gather(self, local: torch.Tensor, n_total: int) -> torch.Tensor:
        """[B, n, dim] shards of every rank -> [B, N, dim] (padding dropped)."""
        B, n, C = local.shape
        out = local.new_empty(self.degree * n, B, C)
        all_gather_tensor(out, local.transpose(0, 1).contiguous(), group=self.group)
        return out.transpose(0, 1)[:, :n_total]

    def around_stack(self, inner, hidden, inp, stack):
        self.outer = (hidden, inp)  # the whole sequence, for inner hooks that need it (the ControlNet's hints)
        local, local_inp, n_total = self.shard(hidden, inp)
        return self.gather(inner(local, local_inp), n_total).contiguous()
