"""FA3-structured attention for Hopper (sm_90a) in Triton's Gluon dialect: opt-in, not the default.

Same contract as ``zimage_kernels.attention`` (non-causal, ``[B, N, H, D]``, per-sample ``kv_lens``, optional fp32 LSE),
restricted to what the structure needs: fp16/bf16, D in {64, 128}, q/k/v (and the output) laid out as
``[B, N, H·D]`` rows (``.unflatten`` views of a Linear output: unit D stride, head stride D, batch stride N·row),
16-byte aligned. Everything else goes to ``zimage_kernels.attention``'s kernels. Selected only by
``zimage_kernels.attention.attention(..., impl="fa3")`` or ``$ZIMAGE_ATTENTION_IMPL=fa3`` (eager calls only; see
``zimage_kernels/README.md``). It has not run on a GPU yet.

Structure (after Shah et al., "FlashAttention-3", arXiv 2407.08608, and Triton's Gluon tutorials):

- Warp specialization with explicit partitions (``gl.warp_specialize``): one load warp (TMA) and two consumer
  warpgroups. The CTA tile is 2·BLOCK_M query rows; each consumer warpgroup owns BLOCK_M of them (wgmma m64 atoms)
  and both share the K/V stages the load warp fills (an mbarrier ring, ``STAGES`` deep, released by both).
- Inter-warpgroup ping-pong: a pair of mbarriers passes a token so that the two warpgroups issue their GEMMs in
  turn (warpgroup 0's GEMMs of block j, then warpgroup 1's, ...), so one warpgroup's softmax runs while the other's
  GEMMs occupy the tensor cores.
- Intra-warpgroup overlap: in each iteration a warpgroup issues ``S_{j+1} = Q·K_{j+1}ᵀ`` and ``O += P_j·V_j`` as
  async wgmma, waits only for S, and computes the softmax of block j+1 while ``P_j·V_j`` is still running.
- Persistent, head-major schedule: ``min(#SMs, #tiles)`` programs walk the tiles in (batch, head, query tile)
  order, so the programs running at once work on the same few heads and their K/V stay in L2.
- Host-side TMA descriptors for Q, K, V and O (2-D over the ``[B·N, H·D]`` row view, coordinates
  ``[b·N + row, h·D]``); only the last KV block of a sample is masked (keys ``>= kv_len`` to -inf); the tail query
  tile (rows past N, which would belong to the next sample) is stored with a masked pointer store instead of TMA.
- Early exit for a padded query block: warpgroup 1's half of a sample's last tile, when it lies past N, computes
  nothing (it only releases the K/V stages) and warpgroup 0 runs that tile without the turn handshake.
- Returns the row log-sum-exp (natural log, fp32 ``[B, H, N]``) when asked (ring attention).

Key rows past ``kv_len`` inside the last block are read (they belong to the same or the next sample) and get
probability exactly 0; they must be finite (they are: padding tokens are embedded like any other token).
"""

from __future__ import annotations

import math

import torch
import triton

from ._gluon import (  # the installed Triton's Gluon API, resolved in one place (triton 3.8 and 3.9)
    TensorDescriptor,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    tma,
    tma_load,
    tma_store,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from ._triton import LOG2E

HEAD_DIMS = (64, 128)
# One config, chosen to fit: 2 consumer warpgroups × 64 rows, 128-key blocks, 2 K/V stages (smem: Q 2×16 KiB,
# K/V 2×2×32 KiB, O 2×16 KiB = 192 KiB at D = 128). Checked by compiling for sm_90a (scripts/aot_compile.py).
BLOCK_M, BLOCK_N, STAGES = 64, 128, 2
# setmaxnreg per worker partition (the load warp is padded to a warpgroup); the default partition (consumer 0) gets
# the rest of the 168-register cap × 384 threads, i.e. also 240 (read off the PTX: scripts/aot_compile.py).
CONSUMER_REGS = gl.constexpr(240)
LOADER_REGS = gl.constexpr(24)


# ---------------------------------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _tile_coords(tile, n_m_tiles, H):
    bh = tile // n_m_tiles
    return bh // H, bh % H, tile % n_m_tiles


@gluon.jit
def _kv_len(KV_LENS, b, N_KV, HAS_KV_LENS):
    n = N_KV
    if HAS_KV_LENS != 0:  # a run-time flag (warp-specialized partitions take no constexpr arguments)
        n = gl.minimum(gl.maximum(gl.load(KV_LENS + b).to(gl.int32), 0), N_KV)
    return n


@gluon.jit
def _softmax_block(qk, m_i, l_i, j, n_blocks, kv_len, qk_scale, BN: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax update for block j (keys j·BN...): masks keys >= kv_len in the last block only. Returns
    (P unnormalized, alpha = rescale of the previous accumulator, new running max, new running sum)."""
    if j == n_blocks - 1:
        cols = gl.arange(0, BN, gl.SliceLayout(0, s_layout))
        qk = gl.where(gl.expand_dims(cols, 0) < kv_len - j * BN, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    pf = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return pf, alpha, m_new, l_i * alpha + gl.sum(pf, 1)


@gluon.jit
def _fa3_loader(
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, KV_LENS,
    N_Q, N_KV, H, n_m_tiles, n_tiles, HAS_KV_LENS,
):  # fmt: skip
    """One warp: TMA loads of each tile's two Q halves and the shared K/V ring."""
    # Partition arguments arrive as run-time values: compile-time sizes are read off the buffers' types.
    BM: gl.constexpr = q_smem.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    NSTAGE: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    c = 0  # K/V blocks issued so far (ring position and phase)
    t = 0  # tiles done by this program (Q buffer phase)
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, mt = _tile_coords(tile, n_m_tiles, H)
        kv_len = _kv_len(KV_LENS, b, N_KV, HAS_KV_LENS)
        row_q = b * N_Q + mt * (2 * BM)
        for wg in gl.static_range(2):
            mbarrier.wait(q_empty.index(wg), (t & 1) ^ 1)  # the consumer's previous tile no longer reads Q
            mbarrier.expect(q_ready.index(wg), q_desc.block_type.nbytes)
            coord = [row_q + wg * BM, h * HEAD_DIM]
            tma_load(q_desc, coord, q_ready.index(wg), q_smem.index(wg))
        row_k = b * N_KV
        for j in range(0, gl.cdiv(kv_len, BN)):
            s = c % NSTAGE
            mbarrier.wait(kv_empty.index(s), ((c // NSTAGE) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma_load(k_desc, [row_k + j * BN, h * HEAD_DIM], kv_ready.index(s), k_smem.index(s))
            tma_load(v_desc, [row_k + j * BN, h * HEAD_DIM], kv_ready.index(s), v_smem.index(s))
            c += 1
        t += 1


@gluon.jit
def _fa3_consumer(
    WG,
    o_desc, q_smem, k_smem, v_smem, o_smem, q_ready, q_empty, kv_ready, kv_empty, turn, KV_LENS, Out, LSE,
    N_Q, N_KV, H, n_m_tiles, n_tiles, qk_scale, HAS_KV_LENS, RETURN_LSE,
):  # fmt: skip
    """Warpgroup ``WG`` (0/1): BM query rows of each tile; online softmax, QK of block j issued with PV of block
    j-1 so the softmax of block j overlaps that PV."""
    BM: gl.constexpr = q_smem.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    NSTAGE: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.dtype

    c = 0  # K/V blocks consumed (ring position/phase, in step with the loader)
    t = 0  # tiles done
    g = 0  # GEMM turns taken (ping-pong phase)
    q_buf = q_smem.index(WG)
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, mt = _tile_coords(tile, n_m_tiles, H)
        kv_len = _kv_len(KV_LENS, b, N_KV, HAS_KV_LENS)
        n_blocks = gl.cdiv(kv_len, BN)
        m0 = mt * (2 * BM) + WG * BM  # first query row of this warpgroup (within the sample)
        # Early exit for a padded query block: when warpgroup 1's rows all lie past N_Q (only the last tile of a
        # sample, and only warpgroup 1 can be), it computes nothing and only releases the K/V stages; warpgroup 0
        # then runs alone, without the GEMM-turn handshake (``pingpong`` is the same value in both warpgroups).
        pingpong = mt * (2 * BM) + BM < N_Q
        active = m0 < N_Q
        n_work = gl.where(active, n_blocks, 0)
        mbarrier.wait(q_ready.index(WG), t & 1)

        m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BM], gl.float32, row_s)
        acc = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        if n_work > 0:
            # Block 0: QK only (no previous P to multiply yet).
            s = c % NSTAGE
            mbarrier.wait(kv_ready.index(s), (c // NSTAGE) & 1)
            mbarrier.wait(turn.index(WG), (g & 1) ^ (1 - WG), pred=pingpong)
            qk = warpgroup_mma(q_buf, k_smem.index(s).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                               use_acc=False, is_async=True)  # fmt: skip
            mbarrier.arrive(turn.index(1 - WG), count=1, pred=pingpong)
            g += pingpong.to(gl.int32)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
            pf, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, 0, n_blocks, kv_len, qk_scale, BN, s_layout)
            p = gl.convert_layout(pf.to(dtype), p_layout)
            s_prev = s
            c += 1
            for j in range(1, n_work):
                s = c % NSTAGE
                mbarrier.wait(kv_ready.index(s), (c // NSTAGE) & 1)
                # Ping-pong: take the GEMM turn, issue QK_j then PV_{j-1}, hand the turn to the other warpgroup.
                mbarrier.wait(turn.index(WG), (g & 1) ^ (1 - WG), pred=pingpong)
                qk = warpgroup_mma(q_buf, k_smem.index(s).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                                   use_acc=False, is_async=True)  # fmt: skip
                acc = warpgroup_mma(p, v_smem.index(s_prev), acc, is_async=True)
                mbarrier.arrive(turn.index(1 - WG), count=1, pred=pingpong)
                g += pingpong.to(gl.int32)
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))  # S_j done; P_{j-1}·V_{j-1} may still run
                # Softmax of block j while P_{j-1}·V_{j-1} runs on the tensor cores.
                pf, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, j, n_blocks, kv_len, qk_scale, BN, s_layout)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(s_prev), count=1)  # K/V stage of block j-1 fully read
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                p = gl.convert_layout(pf.to(dtype), p_layout)
                s_prev = s
                c += 1
            # The last block's PV.
            mbarrier.wait(turn.index(WG), (g & 1) ^ (1 - WG), pred=pingpong)
            acc = warpgroup_mma(p, v_smem.index(s_prev), acc, is_async=True)
            mbarrier.arrive(turn.index(1 - WG), count=1, pred=pingpong)
            g += pingpong.to(gl.int32)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(kv_empty.index(s_prev), count=1)
        for _j in range(n_work, n_blocks):  # padded (inactive) warpgroup: release the stages warpgroup 0 reads
            s = c % NSTAGE
            mbarrier.wait(kv_ready.index(s), (c // NSTAGE) & 1)
            mbarrier.arrive(kv_empty.index(s), count=1)
            c += 1
        mbarrier.arrive(q_empty.index(WG), count=1)

        if (RETURN_LSE != 0) & active:
            rows = m0 + gl.arange(0, BM, row_s)
            lse = (m_i + gl.log2(gl.where(l_i > 0.0, l_i, 1.0))) * 0.6931471805599453  # ln 2: base 2 -> natural
            lse = gl.where(l_i > 0.0, lse, float("-inf"))
            gl.store(LSE + (b * H + h).to(gl.int64) * N_Q + rows, lse, mask=rows < N_Q)
        l_safe = gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), row_o)
        out = (acc / gl.expand_dims(l_safe, 1)).to(dtype)
        if m0 + BM <= N_Q:  # full tile: TMA store through shared memory
            tma.store_wait(pendings=0)  # the previous tile's store has left o_smem
            o_buf = o_smem.index(WG)
            o_buf.store(out)
            fence_async_shared()
            tma_store(o_desc, [b * N_Q + m0, h * HEAD_DIM], o_buf)
        elif m0 < N_Q:  # tail tile: rows past N_Q belong to the next sample, masked pointer store
            rows = m0 + gl.arange(0, BM, row_o)
            cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_layout))
            row_stride = H * HEAD_DIM
            ptrs = Out + (b * N_Q + gl.expand_dims(rows, 1)).to(gl.int64) * row_stride + h * HEAD_DIM
            gl.store(ptrs + gl.expand_dims(cols, 0), out, mask=gl.expand_dims(rows < N_Q, 1))
        t += 1
    tma.store_wait(pendings=0)


@gluon.jit
def _attn_fa3_kernel(
    q_desc, k_desc, v_desc, o_desc, Out, KV_LENS, LSE,
    N_Q, N_KV, H, n_m_tiles, n_tiles, qk_scale,
    HEAD_DIM: gl.constexpr, HAS_KV_LENS: gl.constexpr, RETURN_LSE: gl.constexpr,
    BM: gl.constexpr, BN: gl.constexpr, NSTAGE: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, BM, HEAD_DIM], q_desc.layout)
    o_smem = gl.allocate_shared_memory(dtype, [2, BM, HEAD_DIM], o_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NSTAGE, BN, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NSTAGE, BN, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(NSTAGE):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # released by both consumer warpgroups
    fence_async_shared()

    has_kv_lens = 1 if HAS_KV_LENS else 0
    return_lse = 1 if RETURN_LSE else 0
    shared = (o_desc, q_smem, k_smem, v_smem, o_smem, q_ready, q_empty, kv_ready, kv_empty, turn, KV_LENS, Out, LSE)
    sizes = (N_Q, N_KV, H, n_m_tiles, n_tiles, qk_scale, has_kv_lens, return_lse)
    loader_args = (
        q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, KV_LENS,
        N_Q, N_KV, H, n_m_tiles, n_tiles, has_kv_lens,
    )  # fmt: skip
    gl.warp_specialize(
        [(_fa3_consumer, (0,) + shared + sizes), (_fa3_consumer, (1,) + shared + sizes), (_fa3_loader, loader_args)],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------


def _rows_view_ok(t: torch.Tensor) -> bool:
    """[B, N, H, D] with unit D stride, head stride D and batch stride N·(H·D): a [B·N, H·D] row matrix."""
    B, N, H, D = t.shape
    s_b, s_n, s_h, s_d = t.stride()
    esize = t.element_size()
    return (
        s_d == 1 and s_h == D and s_n >= H * D and (B == 1 or s_b == N * s_n)
        and t.data_ptr() % 16 == 0 and (s_n * esize) % 16 == 0
    )  # fmt: skip


def supports(q, k, v, kv_lens=None, scale=None) -> bool:
    """Whether the FA3 kernel takes these inputs (the caller falls back to ``zimage_kernels.attention`` otherwise)."""
    if not (q.dim() == k.dim() == v.dim() == 4) or q.device.type != "cuda":
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    B, _, H, D = q.shape
    if D not in HEAD_DIMS or k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        return False
    if k.shape[1] == 0 or q.shape[1] == 0 or (scale is not None and not scale > 0):
        return False
    if k.stride() != v.stride() or not all(_rows_view_ok(t) for t in (q, k, v)):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if kv_lens is not None:
        if kv_lens.shape != (B,) or kv_lens.dtype not in (torch.int32, torch.int64) or kv_lens.device != q.device:
            return False
    return True


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM (compile-only paths use meta tensors)


def _desc(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    B, N, H, D = t.shape
    gl_dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, D], gl_dtype)
    return TensorDescriptor(t, [B * N, H * D], [t.stride(1), 1], [block_rows, D], layout)


def _launch(q, k, v, kv_lens=None, scale=None, *, lse=False):
    B, N_Q, H, D = q.shape
    N_KV = k.shape[1]
    out = torch.empty((B, N_Q, H, D), dtype=q.dtype, device=q.device)
    lse_out = torch.empty((B, H, N_Q), dtype=torch.float32, device=q.device) if lse else None
    n_m_tiles = triton.cdiv(N_Q, 2 * BLOCK_M)
    n_tiles = B * H * n_m_tiles
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(D)) * LOG2E
    if kv_lens is not None:
        kv_lens = kv_lens.contiguous()
    grid = (min(_num_sms(q.device), n_tiles),)
    _attn_fa3_kernel[grid](
        _desc(q, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), _desc(out, BLOCK_M), out,
        kv_lens if kv_lens is not None else out, lse_out if lse else out,
        N_Q, N_KV, H, n_m_tiles, n_tiles, qk_scale,
        HEAD_DIM=D, HAS_KV_LENS=kv_lens is not None, RETURN_LSE=lse, BM=BLOCK_M, BN=BLOCK_N, NSTAGE=STAGES,
        num_warps=4, enable_fp_fusion=True,  # explicit: triton 3.10 turns the default off
    )  # fmt: skip
    return (out, lse_out) if lse else out
