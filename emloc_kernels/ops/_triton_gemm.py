"""Triton kernels for ``gemm_2k`` / ``gemm_2n`` (readable torch references:
``gemm_2k_reference`` / ``gemm_2n_reference`` in ``gemm.py``).

Imported only when a kernel runs, so the package imports without triton.  Launch
configurations come from a small shape-keyed table (decode / middle / training), and the
whole launch plan is cached per shape; when the output has too few tiles to fill the GPU the
reduction is split over K into an fp32 workspace that the last program of each tile sums
(decode shapes, ``dyᵀ·t_A``-style weight grads): one launch per GEMM either way.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .quant import QUANT_MODES, PackedOperand, Right, cdiv


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-blocks share the right operand in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _load_right(
    ptr,
    s_ptr,
    o_ptr,
    k0,
    offs_k,
    offs_n,
    k_end,
    N,
    stride_k,
    stride_n,
    ss_k,
    ss_n,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    K_IS_COL: tl.constexpr,
    MASK_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A BK×BN tile (rows ``k0 …``) of the right operand, dequantised in registers when packed.

    Packed (ops/quant.py layout): int8 ``q·scale[row]``; int4 ``nibble·scale[row, col//g] +
    offset[row, col//g]`` with two nibbles per byte along the factor's columns.
    ``K_IS_COL``: the GEMM's K runs along the factor's columns (operand ``Fᵀ``); int4 operands
    of that kind take :func:`_step_int4_along_k` instead.
    """
    kk = offs_k[:, None]
    nn = offs_n[None, :]
    k_ok = _k_rows_ok(kk, k_end, MASK_K)
    mask = k_ok & (nn < N)
    if QUANT == 0:
        b = tl.load(ptr + kk * stride_k + nn * stride_n, mask=mask, other=0.0)
    elif QUANT == 1:
        q = tl.load(ptr + kk * stride_k + nn * stride_n, mask=mask, other=0)
        if K_IS_COL:
            s = tl.load(s_ptr + nn * ss_n, mask=nn < N, other=0.0)
        else:
            s = tl.load(s_ptr + kk * ss_k, mask=kk < k_end, other=0.0)
        b = (_int8_to_f32(q) * s.to(tl.float32)).to(s_ptr.dtype.element_ty)
    else:  # int4, N along the packed bytes: each byte loaded once, its nibbles the even and odd columns
        n_even, n_odd = tl.split(tl.reshape(offs_n, (offs_n.shape[0] // 2, 2)))
        even_ok, odd_ok = k_ok & (n_even[None, :] < N), k_ok & (n_odd[None, :] < N)
        byte = tl.load(ptr + kk * stride_k + (n_even[None, :] // 2) * stride_n, mask=even_ok, other=0).to(tl.int32)
        sidx = kk * ss_k + (n_even[None, :] // GROUP) * ss_n  # GROUP is even: a pair shares its group
        s = tl.load(s_ptr + sidx, mask=even_ok, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + sidx, mask=even_ok, other=0.0).to(tl.float32)
        lo = tl.where(even_ok, _nibble_to_f32(byte & 0xF) * s + o, 0.0)
        hi = tl.where(odd_ok, _nibble_to_f32(byte >> 4) * s + o, 0.0)
        b = tl.interleave(lo, hi).to(s_ptr.dtype.element_ty)
    return b


@triton.jit
def _k_rows_ok(kk, k_end, MASK_K: tl.constexpr):
    """Rows of a K tile inside the reduction: all of them in full tiles (a mask that is constant
    along K lets loads vectorise), those before ``k_end`` in the tail tile."""
    if MASK_K:
        return kk < k_end
    return kk >= 0


@triton.jit
def _int8_to_f32(q):
    """int8 to fp32 by the exponent trick (see _nibble_to_f32), shifted by 128 to be positive."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.int32).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _nibble_to_f32(nib):
    """0..15 (int32) to fp32 by the exponent trick: the bits of 2²³ + nib, minus 2²³ -- one
    integer OR and one float add instead of an int→float conversion (quarter throughput)."""
    return (nib | 0x4B000000).to(tl.int32).to(tl.float32, bitcast=True) - 8388608.0  # (the interpreter widens)


@triton.jit
def _step_int4_along_k(
    acc,
    a,
    b_ptr,
    s_ptr,
    o_ptr,
    k0,
    k_end,
    offs_n,
    N,
    stride_bk,
    stride_bn,
    ss_k,
    ss_n,
    GROUP: tl.constexpr,
    F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MASK_K: tl.constexpr,
):
    """``acc += a·Bᵀ-tile`` for an int4 factor whose packed bytes run along K (operand ``Fᵀ``).

    Each byte is loaded once, as a (BK/2)×BN tile contiguous along K (wide loads): its low
    nibbles are the even k, its high nibbles the odd k, multiplied by the even and odd columns
    of ``a`` (split in registers).  The K tile lies inside one group (launcher: BLOCK_K ≤ g,
    k0 a multiple of BLOCK_K), so scale and offset are one BN-vector each; with few rows
    (decode) they are applied after the dot, ``s·(a·q) + o·Σa``, not to every weight."""
    offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    if MASK_K:  # bytes up to the group boundary exist (zero padding); a is 0 past k_end
        mask = (offs_j[:, None] < (k_end + GROUP - 1) // GROUP * (GROUP // 2)) & (offs_n[None, :] < N)
    else:
        mask = (offs_j[:, None] >= 0) & (offs_n[None, :] < N)
    byte = tl.load(b_ptr + offs_j[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=mask, other=0)
    byte = byte.to(tl.int32)
    lo, hi = _nibble_to_f32(byte & 0xF), _nibble_to_f32(byte >> 4)
    a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))
    sidx = (k0 // GROUP) * ss_k + offs_n * ss_n
    s = tl.load(s_ptr + sidx, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    o = tl.load(o_ptr + sidx, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if a.shape[0] < BLOCK_K:
        part = tl.zeros((a.shape[0], offs_n.shape[0]), dtype=tl.float32)
        part = _dot(part, a_even, lo, F32, PRECISION)
        part = _dot(part, a_odd, hi, F32, PRECISION)
        rows = tl.sum(a_even.to(tl.float32), 1) + tl.sum(a_odd.to(tl.float32), 1)
        acc += s * part + o * rows[:, None]
    else:
        dt = s_ptr.dtype.element_ty
        acc = _dot(acc, a_even, tl.where(mask, lo * s + o, 0.0).to(dt), F32, PRECISION)
        acc = _dot(acc, a_odd, tl.where(mask, hi * s + o, 0.0).to(dt), F32, PRECISION)
    return acc


@triton.jit
def _dot(acc, a, b, F32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += a·b``: tensor cores for matching 16-bit operands, fp32/tf32 otherwise."""
    if F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc


@triton.jit
def _step(
    acc,
    a_ptr,
    offs_m,
    m_ok,
    stride_am,
    stride_ak,
    b_ptr,
    s_ptr,
    o_ptr,
    offs_n,
    N,
    stride_bk,
    stride_bn,
    ss_k,
    ss_n,
    k0,
    k_end,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    K_IS_COL: tl.constexpr,
    F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MASK_K: tl.constexpr,
):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if MASK_K:
        a_mask = m_ok & (offs_k[None, :] < k_end)
    else:
        a_mask = m_ok & (offs_k[None, :] >= 0)
    a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)
    if QUANT == 2 and K_IS_COL:
        acc = _step_int4_along_k(
            acc,
            a,
            b_ptr,
            s_ptr,
            o_ptr,
            k0,
            k_end,
            offs_n,
            N,
            stride_bk,
            stride_bn,
            ss_k,
            ss_n,
            GROUP,
            F32,
            PRECISION,
            BLOCK_K,
            MASK_K,
        )
    else:
        b = _load_right(
            b_ptr,
            s_ptr,
            o_ptr,
            k0,
            offs_k,
            offs_n,
            k_end,
            N,
            stride_bk,
            stride_bn,
            ss_k,
            ss_n,
            QUANT,
            GROUP,
            K_IS_COL,
            MASK_K,
            BLOCK_K,
        )
        acc = _dot(acc, a, b, F32, PRECISION)
    return acc


@triton.jit
def _reduce(
    acc,
    a_ptr,
    offs_m,
    m_ok,
    stride_am,
    stride_ak,
    b_ptr,
    s_ptr,
    o_ptr,
    offs_n,
    N,
    stride_bk,
    stride_bn,
    ss_k,
    ss_n,
    k_lo,
    k_hi,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    K_IS_COL: tl.constexpr,
    F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc += A[:, k_lo:k_hi]·B[k_lo:k_hi, :]``: whole K tiles without a K mask (so loads
    vectorise and pipeline whatever the rank), then one masked tail tile."""
    k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
    for k0 in range(k_lo, k_full, BLOCK_K):
        acc = _step(
            acc,
            a_ptr,
            offs_m,
            m_ok,
            stride_am,
            stride_ak,
            b_ptr,
            s_ptr,
            o_ptr,
            offs_n,
            N,
            stride_bk,
            stride_bn,
            ss_k,
            ss_n,
            k0,
            k_hi,
            QUANT,
            GROUP,
            K_IS_COL,
            F32,
            PRECISION,
            BLOCK_K,
            False,
        )
    if k_full < k_hi:
        acc = _step(
            acc,
            a_ptr,
            offs_m,
            m_ok,
            stride_am,
            stride_ak,
            b_ptr,
            s_ptr,
            o_ptr,
            offs_n,
            N,
            stride_bk,
            stride_bn,
            ss_k,
            ss_n,
            k_full,
            k_hi,
            QUANT,
            GROUP,
            K_IS_COL,
            F32,
            PRECISION,
            BLOCK_K,
            True,
        )
    return acc


@triton.jit
def _store(acc, c_ptr, stride_cm, stride_cn, offs_m, offs_n, M, N, bias_ptr, stride_bias, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _finish(
    acc,
    c_ptr,
    stride_cm,
    stride_cn,
    ws_ptr,
    stride_ws,
    cnt_ptr,
    offs_m,
    offs_n,
    M,
    N,
    bias_ptr,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Store the finished tile (+ bias).  Split over K (grid axis 1): store this program's fp32
    partial in ``ws`` (split×M×N), count it in ``cnt[tile]``; the program that counts last sums
    the partials, in split order (the result does not depend on timing), stores the tile and
    sets the counter back to zero, so no reduction launch follows the kernel and the counters
    are ready for the next launch (see ``_counters``)."""
    if SPLIT:
        # partial rows padded to 16 columns and stored whole: the mask is constant over 16
        # columns, so partials move in 16-byte loads (the padding never reaches C)
        width = tl.cdiv(N, 16) * 16
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < width)
        ws = ws_ptr + offs_m[:, None] * width + offs_n[None, :]
        tl.store(ws + tl.program_id(1) * stride_ws, acc, mask=mask)
        tl.debug_barrier()  # all of this program's partial is written before it is counted
        if tl.atomic_add(cnt_ptr + tl.program_id(0), 1) == tl.num_programs(1) - 1:  # acq_rel, gpu scope
            total = tl.zeros_like(acc)
            for s in range(0, tl.num_programs(1)):
                total += tl.load(ws + s * stride_ws, mask=mask, other=0.0, cache_modifier=".cg")
            _store(total, c_ptr, stride_cm, stride_cn, offs_m, offs_n, M, N, bias_ptr, stride_bias, HAS_BIAS)
            tl.store(cnt_ptr + tl.program_id(0), 0)  # every program of the tile has counted
    else:
        _store(acc, c_ptr, stride_cm, stride_cn, offs_m, offs_n, M, N, bias_ptr, stride_bias, HAS_BIAS)


@triton.jit
def _gemm_2k_kernel(
    a1_ptr,
    b1_ptr,
    s1_ptr,
    o1_ptr,
    a2_ptr,
    b2_ptr,
    bias_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K1,
    K2,
    k1_per_split,
    n1_load,
    stride_a1m,
    stride_a1k,
    stride_b1k,
    stride_b1n,
    stride_s1k,
    stride_s1n,
    stride_a2m,
    stride_a2k,
    stride_b2k,
    stride_b2n,
    stride_cm,
    stride_cn,
    stride_ws,
    stride_bias,
    alpha1,
    alpha2,
    QUANT1: tl.constexpr,
    GROUP1: tl.constexpr,
    K_IS_COL1: tl.constexpr,
    HAS_SEG2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    F32DOT1: tl.constexpr,
    F32DOT2: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C = α₁·A₁B₁ (this program's k-range of it) + α₂·A₂B₂ (on split 0) + bias.

    B₁ columns are loaded up to ``n1_load`` ≥ N (see ``_load_bound``); the extra columns only
    reach output columns that are never stored.
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m[:, None] < M

    k_start = pid_k * k1_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _reduce(
        acc,
        a1_ptr,
        offs_m,
        m_ok,
        stride_a1m,
        stride_a1k,
        b1_ptr,
        s1_ptr,
        o1_ptr,
        offs_n,
        n1_load,
        stride_b1k,
        stride_b1n,
        stride_s1k,
        stride_s1n,
        k_start,
        tl.minimum(K1, k_start + k1_per_split),
        QUANT1,
        GROUP1,
        K_IS_COL1,
        F32DOT1,
        PRECISION,
        BLOCK_K,
    )
    if HAS_SEG2:
        if pid_k == 0:  # segment 2 once, on the first split
            # one accumulator for both segments (a second holds BLOCK_M·BLOCK_N more fp32 values
            # in registers): α₁S₁ + α₂S₂ = α₂·((α₁/α₂)·S₁ + S₂); α₂ ≠ 0 (the host drops a zero segment)
            acc = acc * (alpha1 / alpha2)
            acc = _reduce(
                acc,
                a2_ptr,
                offs_m,
                m_ok,
                stride_a2m,
                stride_a2k,
                b2_ptr,
                b2_ptr,
                b2_ptr,
                offs_n,
                N,
                stride_b2k,
                stride_b2n,
                0,
                0,
                0,
                K2,
                0,
                1,
                False,
                F32DOT2,
                PRECISION,
                BLOCK_K2,
            )
            alpha1 = alpha2
    acc = acc * alpha1
    _finish(
        acc,
        c_ptr,
        stride_cm,
        stride_cn,
        ws_ptr,
        stride_ws,
        cnt_ptr,
        offs_m,
        offs_n,
        M,
        N,
        bias_ptr,
        stride_bias,
        HAS_BIAS,
        SPLIT,
    )


@triton.jit
def _gemm_2n_kernel(
    a_ptr,
    b1_ptr,
    s1_ptr,
    o1_ptr,
    b2_ptr,
    c1_ptr,
    c2_ptr,
    ws1_ptr,
    ws2_ptr,
    cnt_ptr,
    M,
    N1,
    N2,
    K,
    k_per_split,
    n1_load,
    stride_am,
    stride_ak,
    stride_b1k,
    stride_b1n,
    stride_s1k,
    stride_s1n,
    stride_b2k,
    stride_b2n,
    stride_c1m,
    stride_c1n,
    stride_c2m,
    stride_c2n,
    stride_ws1,
    stride_ws2,
    alpha2,
    QUANT1: tl.constexpr,
    GROUP1: tl.constexpr,
    K_IS_COL1: tl.constexpr,
    SPLIT: tl.constexpr,
    F32DOT1: tl.constexpr,
    F32DOT2: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Column blocks [0, nb1) compute C₁ = A·B₁, the rest C₂ = α₂·A·B₂; the grouped order
    makes the programs of one row-block run together, so A comes from HBM once."""
    nb1 = tl.cdiv(N1, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), nb1 + tl.cdiv(N2, BLOCK_N2), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m[:, None] < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    # each branch names its own tiles: values live past an if/else must agree in type
    if pid_n < nb1:
        offs_n1 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = _reduce(
            acc1,
            a_ptr,
            offs_m,
            m_ok,
            stride_am,
            stride_ak,
            b1_ptr,
            s1_ptr,
            o1_ptr,
            offs_n1,
            n1_load,
            stride_b1k,
            stride_b1n,
            stride_s1k,
            stride_s1n,
            k_start,
            k_end,
            QUANT1,
            GROUP1,
            K_IS_COL1,
            F32DOT1,
            PRECISION,
            BLOCK_K,
        )
        _finish(
            acc1,
            c1_ptr,
            stride_c1m,
            stride_c1n,
            ws1_ptr,
            stride_ws1,
            cnt_ptr,
            offs_m,
            offs_n1,
            M,
            N1,
            c1_ptr,
            0,
            False,
            SPLIT,
        )
    else:
        offs_n2 = ((pid_n - nb1) * BLOCK_N2 + tl.arange(0, BLOCK_N2)).to(tl.int64)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
        acc2 = _reduce(
            acc2,
            a_ptr,
            offs_m,
            m_ok,
            stride_am,
            stride_ak,
            b2_ptr,
            b2_ptr,
            b2_ptr,
            offs_n2,
            N2,
            stride_b2k,
            stride_b2n,
            0,
            0,
            k_start,
            k_end,
            0,
            1,
            False,
            F32DOT2,
            PRECISION,
            BLOCK_K,
        )
        _finish(
            acc2 * alpha2,
            c2_ptr,
            stride_c2m,
            stride_c2n,
            ws2_ptr,
            stride_ws2,
            cnt_ptr,
            offs_m,
            offs_n2,
            M,
            N2,
            c2_ptr,
            0,
            False,
            SPLIT,
        )


# ----------------------------------------------------------------------------- launch side


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int


# Triton chooses interpreter or compiler when the kernels above are decorated, i.e. now.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Host-side integer helpers in plain Python: ``triton.cdiv`` / ``triton.next_power_of_2`` are
# constexpr functions whose host calls cost microseconds each, and every launch made dozens.
def _pow2_clamp(n: int, hi: int) -> int:
    return max(16, min(hi, 1 << max(n - 1, 0).bit_length()))


@functools.lru_cache(maxsize=4096)
def config(m: int, n: int, k: int, f32: bool, sms: int, interpret: bool) -> Config:
    """Launch configuration for an M×N×K GEMM (cached per shape class).

    decode (M ≤ 16): BLOCK_M 16, wide K tiles, BLOCK_N 32 when 64 leaves SMs idle
    (weight-bandwidth bound: every SM should stream weights);
    training (M ≥ 1024): 128×128×64, 8 warps, 3 stages (Hopper tensor cores);
    middle: 64×128×64.  fp32 operands halve BLOCK_K to stay inside shared memory.
    Fewer tiles than half the SMs: split K (fp32 partials, summed in the kernel by the
    last program of each tile, see ``_finish``).
    Under the interpreter tiles are small: it runs every program in numpy.
    """
    if interpret:
        bm, bn, bk, group, warps, stages = 32, 32, 32, 4, 1, 1
    elif m <= 16:
        bm, bn, bk, group, warps, stages = 16, 64 if cdiv(n, 64) >= sms else 32, 128, 1, 4, 4
    elif m >= 1024:
        bm, bn, bk, group, warps, stages = 128, 128, 64, 8, 8, 3
    else:
        bm, bn, bk, group, warps, stages = 64, 128, 64, 8, 4, 3
    if f32 and not interpret:
        bk //= 2
    bm, bn, bk = _pow2_clamp(m, bm), _pow2_clamp(n, bn), _pow2_clamp(k, bk)
    tiles = cdiv(m, bm) * cdiv(n, bn)
    split = 1
    if 2 * tiles < sms:
        split = max(1, min(cdiv(2 * sms, tiles), k // (2 * bk), 32))
    return Config(bm, bn, bk, group, warps, stages, split)


def _sms(device: torch.device) -> int:
    return (
        16
        if device.type != "cuda"
        else _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    )


def _precision() -> str:
    """fp32 dots follow torch's matmul precision setting (tf32 unless it is 'highest')."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _f32_dot(a: torch.dtype, b: torch.dtype, interpret: bool) -> bool:
    """Whether a·b runs in fp32: mixed or fp32 operands, and bf16 under the interpreter, whose
    bf16 ``tl.dot`` returns garbage (triton 3.9); bf16 products are exact in fp32 anyway."""
    if interpret and torch.bfloat16 in (a, b):
        return True
    return not (a == b and a in (torch.float16, torch.bfloat16))


def _pad16(n: int) -> int:
    return cdiv(n, 16) * 16


def _alloc(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output comes from here (tests poison it with NaN).  ``empty_strided`` costs
    the host about half of ``torch.empty``, and gives padded rows without a slicing view."""
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


def _load_bound(b: torch.Tensor) -> int:
    """Columns the kernel may load from the K×N operand ``b``: N rounded up to 16 when ``b`` is
    contiguous along N and its storage holds that many columns in every row (padded rows,
    e.g. ``aligned_rows``), else N.  A 16-aligned bound keeps the N mask constant over 16
    columns, so loads vectorise; column j of the product only depends on column j of ``b``,
    so the extra (padding) columns only reach outputs that are never stored."""
    k, n = b.shape
    n16 = _pad16(n)
    if n16 == n or k == 0 or b.stride(1) != 1 or b.stride(0) < n16:
        return n
    end = b.storage_offset() + (k - 1) * b.stride(0) + n16
    return n16 if end * b.element_size() <= b.untyped_storage().nbytes() else n


class _RightArgs(NamedTuple):
    ptr: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    stride_k: int
    stride_n: int
    ss_k: int
    ss_n: int
    quant: int
    group: int
    k_is_col: bool
    dtype: torch.dtype
    n_load: int

    @property
    def strides(self) -> tuple[int, int, int, int]:
        """The kernels' right-operand stride arguments: data (k, n), then scales (k, n)."""
        return self.stride_k, self.stride_n, self.ss_k, self.ss_n


def _right_args(b: Right) -> _RightArgs:
    """Kernel arguments for a K×N right operand; packed strides are in (k, n) order."""
    if not isinstance(b, PackedOperand):
        return _RightArgs(b, b, b, b.stride(0), b.stride(1), 0, 0, 0, 1, False, b.dtype, _load_bound(b))
    p = b.factor
    scale = p.scale.contiguous()
    offset = p.offset.contiguous() if p.offset is not None else scale
    q0, q1 = p.qweight.stride()
    s0, s1 = scale.stride()
    sk, sn, ssk, ssn = (q1, q0, s1, s0) if b.trans else (q0, q1, s0, s1)
    group = p.group_size if p.fmt == "int4" else 1
    return _RightArgs(
        p.qweight, scale, offset, sk, sn, ssk, ssn, QUANT_MODES[p.fmt], group, b.trans, p.dtype, b.shape[1]
    )


class _Plan(NamedTuple):
    """Everything about a launch that follows from shapes, dtypes and the device class."""

    tiles: int
    split: int
    k_per: int
    consts: dict  # the kernel's constexpr arguments


def _block_k(cfg: Config, quant: int, group: int, k_is_col: bool) -> int:
    """int4 along K: a K tile inside one quantisation group (one scale vector per tile), at
    least 32 wide (each half, even and odd k, feeds a dot of depth ≥ 16)."""
    return max(32, min(cfg.block_k, group)) if quant == QUANT_MODES["int4"] and k_is_col else cfg.block_k


@functools.lru_cache(maxsize=4096)
def _plan(
    kind: str,
    m: int,
    n1: int,
    n2: int,
    k1: int,
    k2: int,
    dt_a: torch.dtype,
    dt_b1: torch.dtype,
    dt_a2: torch.dtype,
    dt_b2: torch.dtype,
    quant: int,
    group: int,
    k_is_col: bool,
    has_bias: bool,
    sms: int,
    precision: str,
) -> _Plan:
    """The launch plan of one GEMM, cached: repeated calls (every layer of every step) skip the
    arithmetic; ``kind`` is "2k" (N = n1, segment 2 of depth k2 when k2 > 0) or "2n"
    (N = n1 + n2)."""
    f32_1 = _f32_dot(dt_a, dt_b1, _INTERPRETED)
    f32_2 = _f32_dot(dt_a2, dt_b2, _INTERPRETED)
    if kind == "2k":
        cfg = config(m, n1, k1, f32_1, sms, _INTERPRETED)
        tiles = cdiv(m, cfg.block_m) * cdiv(n1, cfg.block_n)
        own = {
            "HAS_SEG2": k2 > 0,
            "HAS_BIAS": has_bias,
            "F32DOT2": k2 > 0 and f32_2,
            "BLOCK_K2": _pow2_clamp(k2, 32 if f32_2 else 64),
        }
    else:
        cfg = config(m, n1 + n2, k1, f32_1 or f32_2, sms, _INTERPRETED)
        block_n2 = _pow2_clamp(n2, cfg.block_n)
        tiles = cdiv(m, cfg.block_m) * (cdiv(n1, cfg.block_n) + cdiv(n2, block_n2))
        own = {"F32DOT2": f32_2, "BLOCK_N2": block_n2}
    bk = _block_k(cfg, quant, group, k_is_col)
    k_per = cdiv(cdiv(k1, cfg.split_k), bk) * bk
    split = cdiv(k1, k_per)
    consts = {
        "QUANT1": quant,
        "GROUP1": group,
        "K_IS_COL1": k_is_col,
        "SPLIT": split > 1,
        "F32DOT1": f32_1,
        "PRECISION": precision,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": bk,
        "GROUP_M": cfg.group_m,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        **own,
    }
    return _Plan(tiles, split, k_per, consts)


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(tiles: int, device: torch.device) -> torch.Tensor:
    """Zeroed per-tile split-K counters.  The program that finishes a tile sets its counter back
    to zero (``_finish``), so one buffer per device and stream serves every launch on that
    stream in turn, without a memset per call; a CUDA-graph capture gets a buffer of its own."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(tiles, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = _COUNTERS[key] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return buf


def _workspaces(plan: _Plan, m: int, widths: tuple[int, ...], device: torch.device):
    """fp32 partials (split×M×width each, rows padded to 16 elements) and the counters for a
    split-K launch; without split, ``None`` (the kernel never touches them)."""
    if plan.split == 1:
        return (None,) * len(widths), None
    return tuple(
        _alloc((plan.split, m, _pad16(w)), (m * _pad16(w), _pad16(w), 1), torch.float32, device) for w in widths
    ), _counters(plan.tiles, device)


def _right_tensors(b: Right) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors a right operand passes to the kernels: (data, scale, offset); a float
    operand stands in for the two it has not."""
    if not isinstance(b, PackedOperand):
        return b, b, b
    p = b.factor
    scale = p.scale.contiguous()
    return p.qweight, scale, p.offset.contiguous() if p.offset is not None else scale


class Launch2k:
    """A prepared ``gemm_2k``: everything that follows from its operands' shapes, strides,
    dtypes and device (plan, grid, integer arguments), worked out once.  Called with operands
    of that layout (the data may differ), it allocates the output and launches: an op keeps
    these per layer and input layout, so repeated calls skip the host arithmetic."""

    __slots__ = ("m", "n", "seg2", "out_dtype", "device", "plan", "grid", "ints", "out_shape", "out_strides")

    def __init__(self, a1, b1: Right, a2, b2, alpha1: float, alpha2: float, bias, out_dtype: torch.dtype) -> None:
        m, k1 = a1.shape
        n = b1.shape[1]
        k2 = a2.shape[1] if a2 is not None and alpha2 != 0 else 0  # (the kernel divides by α₂)
        r = _right_args(b1)
        if k2 == 0:
            a2 = b2 = a1  # stand-ins the kernel never reads
        self.plan = plan = _plan(
            "2k",
            m,
            n,
            0,
            k1,
            k2,
            a1.dtype,
            r.dtype,
            a2.dtype,
            b2.dtype,
            r.quant,
            r.group,
            r.k_is_col,
            bias is not None,
            _sms(a1.device),
            _precision(),
        )
        self.m, self.n, self.seg2, self.out_dtype, self.device = m, n, k2 > 0, out_dtype, a1.device
        self.out_shape: tuple[int, ...] = (m, n)
        self.out_strides: tuple[int, ...] = (n, 1)
        self.grid = (plan.tiles, plan.split)
        # (the output is contiguous: its strides are (n, 1))
        self.ints = (
            m,
            n,
            k1,
            k2,
            plan.k_per,
            r.n_load,
            *a1.stride(),
            *r.strides,
            *a2.stride(),
            *b2.stride(),
            n,
            1,
            m * _pad16(n),
            bias.stride(0) if bias is not None else 0,
            float(alpha1),
            float(alpha2),
        )

    def shape_output(self, lead: tuple[int, ...]) -> None:
        """Later calls return C in the leading shape ``lead`` (its M rows in order, contiguous),
        as a caller of the op passed x: no view of the output per call (microseconds each)."""
        if math.prod(lead) != self.m:
            raise ValueError(f"shape_output: lead {lead} does not hold the launch's {self.m} rows")
        shape = (*lead, self.n)
        strides = [1]
        for d in reversed(shape[1:]):
            strides.insert(0, strides[0] * d)
        self.out_shape, self.out_strides = shape, tuple(strides)

    def __call__(self, a1, b1: Right, a2, b2, bias) -> torch.Tensor:
        c = _alloc(self.out_shape, self.out_strides, self.out_dtype, self.device)
        (ws,), cnt = _workspaces(self.plan, self.m, (self.n,), self.device) if self.grid[1] > 1 else ((None,), None)
        data, scale, offset = _right_tensors(b1)
        if not self.seg2:
            a2 = b2 = a1
        _gemm_2k_kernel[self.grid](
            a1,
            data,
            scale,
            offset,
            a2,
            b2,
            bias if bias is not None else a1,
            c,
            ws if ws is not None else c,
            cnt if cnt is not None else c,
            *self.ints,
            **self.plan.consts,
        )
        return c


class Launch2n:
    """A prepared ``gemm_2n`` (as :class:`Launch2k`)."""

    __slots__ = ("m", "n1", "n2", "out_dtypes", "device", "plan", "grid", "ints")

    def __init__(self, a, b1: Right, b2, alpha2: float, out_dtypes: tuple[torch.dtype, torch.dtype]) -> None:
        m, k = a.shape
        n1, n2 = b1.shape[1], b2.shape[1]
        r = _right_args(b1)
        self.plan = plan = _plan(
            "2n",
            m,
            n1,
            n2,
            k,
            0,
            a.dtype,
            r.dtype,
            a.dtype,
            b2.dtype,
            r.quant,
            r.group,
            r.k_is_col,
            False,
            _sms(a.device),
            _precision(),
        )
        self.m, self.n1, self.n2, self.out_dtypes, self.device = m, n1, n2, out_dtypes, a.device
        self.grid = (plan.tiles, plan.split)
        # (C₁'s rows are padded to 16 elements: strides (pad16(n1), 1); C₂ is contiguous)
        self.ints = (
            m,
            n1,
            n2,
            k,
            plan.k_per,
            r.n_load,
            *a.stride(),
            *r.strides,
            *b2.stride(),
            _pad16(n1),
            1,
            n2,
            1,
            m * _pad16(n1),
            m * _pad16(n2),
            float(alpha2),
        )

    def __call__(self, a, b1: Right, b2) -> tuple[torch.Tensor, torch.Tensor]:
        # C₁ (t_v, dt_v) is an intermediate of the op: rows padded to 16 elements keep the next
        # GEMM's loads aligned (vectorised, pipelined) whatever the rank.  C₂ (t_A) is returned by
        # the forward op, so it stays contiguous like its fake (meta) version.
        c1 = _alloc((self.m, self.n1), (_pad16(self.n1), 1), self.out_dtypes[0], self.device)
        c2 = _alloc((self.m, self.n2), (self.n2, 1), self.out_dtypes[1], self.device)
        (ws1, ws2), cnt = (
            _workspaces(self.plan, self.m, (self.n1, self.n2), self.device)
            if self.grid[1] > 1
            else ((None, None), None)
        )
        data, scale, offset = _right_tensors(b1)
        _gemm_2n_kernel[self.grid](
            a,
            data,
            scale,
            offset,
            b2,
            c1,
            c2,
            ws1 if ws1 is not None else c1,
            ws2 if ws2 is not None else c2,
            cnt if cnt is not None else c2,
            *self.ints,
            **self.plan.consts,
        )
        return c1, c2


def prepare_2k(a1, b1: Right, a2, b2, alpha1: float, alpha2: float, bias, out_dtype: torch.dtype) -> Launch2k | None:
    """The launch of ``gemm_2k`` for these operands' layout; ``None`` when there is nothing to
    launch (no rows, columns or depth: the reference is exact)."""
    if a1.shape[0] == 0 or b1.shape[1] == 0 or a1.shape[1] == 0:
        return None
    return Launch2k(a1, b1, a2, b2, alpha1, alpha2, bias, out_dtype)


def prepare_2n(a, b1: Right, b2, alpha2: float, out_dtypes: tuple[torch.dtype, torch.dtype]) -> Launch2n | None:
    """The launch of ``gemm_2n`` for these operands' layout; ``None`` when there is nothing to launch."""
    if a.shape[0] == 0 or a.shape[1] == 0 or b1.shape[1] == 0 or b2.shape[1] == 0:
        return None
    return Launch2n(a, b1, b2, alpha2, out_dtypes)
