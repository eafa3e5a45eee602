"""Attention of one new token over a static KV cache (decode), split over the cache (flash-decoding).

In the 7B decode step (H200 profiles, sessions 9-11) cuDNN's SDPA, a prefill kernel, takes
~310 us of ~2330 (9.7 us a layer): it reads the whole 512-slot cache of every layer, also the
slots the mask hides. In the step this kernel and its combine take 7.1 us a layer (1.37x; 2.0x in
isolation, bench_decode_attention.py), and at the 8B shape 6.6 against 16.6 for cuDNN plus HF's
repeat_kv copy of the cache (2.5x). Each program takes one (batch row, query head) and a range
of cache blocks: it reads the mask first and reads K/V only at the slots it shows (False or -inf
hide a slot), so the unwritten end of a static cache costs no K/V traffic, then runs the online
softmax in float32; a second kernel combines the splits. Query heads that share a KV head
(grouped-query attention) each read its K/V: rep reads of the same slots, L2 hits at best; one
program per KV head with the rep query rows through tl.dot would read them once (not built).

    out (B, H, 1, D) = softmax(q K^T * scale + mask) V

Masks as scaled_dot_product_attention takes them: boolean (True = attend) or additive float,
broadcastable to (B, H, 1, L). A row with every slot hidden gives 0, as SDPA does (torch 2.13).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import launch

# Launch parameters from sweep_decode_attention.py (H200, session 11; docs/results.md): 64 slots
# per block beat 16 and 32; the splits aim at 4 programs per SM. 4 warps won only at the lowest
# occupancy, batch 1 of 32 heads (7B: 7.6 us per layer against 8.3 with 2; 8B: 6.3 against 6.0),
# 2 warps won by far at batch 8 (19.7 against 30.9); batches 2-4 were not measured, so 4 warps
# only up to a quarter of a (batch row, query head) pair per SM. Loading V with K (before the
# scores) lost at 64 slots (9.7 us). Offline sm_90 build at head dim 128: 80 registers at 4
# warps, ~150 at 2, no spills.
BLOCK_L = 64        # cache slots per iteration
PROGRAMS_PER_SM = 4
MAX_SPLITS = 64     # the combine kernel holds splits x head dim floats: 64 x 128 in 4 warps, no spills
MAX_HEAD_DIM = 256
# MASK kinds (constexprs: the kernels compare against them)
NO_MASK, BOOL_MASK, ADD_MASK = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, ml_ptr, H, L, GROUP,
                                   blocks_per_split, n_split, sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                                   sm_b, sm_h, sm_l, scale, MASK: tl.constexpr, D: tl.constexpr, BL: tl.constexpr):
    """Program (b * H + h, split): the unnormalized softmax-weighted sum of V over its blocks
    (acc, D floats), the running max m and the sum of exponentials l."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    d = tl.arange(0, D)
    # Inductor passes a Python float as fp64 (the JIT as fp32): round it to float32 first, so that
    # eager and compiled calls compute the same scores
    q = tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * tl.cast(scale, tl.float32)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    m_base = mask_ptr + b * sm_b + h * sm_h
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros((D,), tl.float32)
    first = split * blocks_per_split
    for blk in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(L, BL))):
        slots = blk * BL + tl.arange(0, BL)
        keep = slots < L
        if MASK == BOOL_MASK:
            keep = keep & (tl.load(m_base + slots * sm_l, mask=keep, other=0) != 0)
        if MASK == ADD_MASK:  # -inf hides a slot as False does (a NaN does not: it propagates)
            add = tl.load(m_base + slots * sm_l, mask=keep, other=float("-inf")).to(tl.float32)
            keep = keep & (add != float("-inf"))
        if tl.max(keep.to(tl.int32), axis=0) > 0:  # else the mask hides the block: no K/V reads
            rows = slots.to(tl.int64)[:, None]
            k = tl.load(k_base + rows * sk_l + d[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            if MASK == ADD_MASK:
                s += add
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every score -inf so far
            p = tl.exp(s - m_safe)
            rescale = tl.exp(m_i - m_safe)
            v = tl.load(v_base + rows * sv_l + d[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * rescale + tl.sum(p, axis=0)
            m_i = m_new
    part = bh.to(tl.int64) * n_split + split
    tl.store(acc_ptr + part * D + d, acc)
    tl.store(ml_ptr + part * 2, m_i)
    tl.store(ml_ptr + part * 2 + 1, l_i)


@triton.jit
def _decode_attention_combine_kernel(acc_ptr, ml_ptr, out_ptr, n_split, so_b, so_h, H,
                                     D: tl.constexpr, NS: tl.constexpr):
    """out[b, h, 0] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s (0 when no
    split saw a slot)."""
    bh = tl.program_id(0)
    s = tl.arange(0, NS)
    ok = s < n_split
    d = tl.arange(0, D)
    part = bh.to(tl.int64) * n_split + s
    m = tl.load(ml_ptr + part * 2, mask=ok, other=float("-inf"))
    l_s = tl.load(ml_ptr + part * 2 + 1, mask=ok, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    big = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big))  # splits that saw no slot weigh 0
    den = tl.sum(l_s * w, axis=0)
    out = tl.where(den == 0, 0.0, tl.sum(acc * w[:, None], axis=0) / den)  # every slot hidden: 0, as SDPA
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty))


class LaunchPlan(NamedTuple):
    n_split: int     # programs per (batch row, query head), each over per_split cache blocks
    per_split: int
    num_warps: int   # of the split kernel


def launch_plan(batch_heads: int, length: int, sms: int, n_split: Optional[int] = None,
                block_l: int = BLOCK_L, num_warps: Optional[int] = None,
                programs_per_sm: int = PROGRAMS_PER_SM) -> LaunchPlan:
    """How to spread a cache of ``length`` slots for ``batch_heads`` (batch row, query head) pairs
    over ``sms`` SMs: ``n_split`` programs per pair (default: ``programs_per_sm`` programs per SM,
    at most MAX_SPLITS; never more than the cache has blocks of ``block_l``, never an empty one)
    and the split kernel's warps (default: 4 up to a quarter of a pair per SM, else 2)."""
    blocks = triton.cdiv(length, block_l)
    if n_split is None:
        n_split = min(MAX_SPLITS, triton.cdiv(programs_per_sm * sms, batch_heads))
    per_split = triton.cdiv(blocks, max(1, min(n_split, blocks)))
    if num_warps is None:
        num_warps = 4 if 4 * batch_heads <= sms else 2
    return LaunchPlan(triton.cdiv(blocks, per_split), per_split, num_warps)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: Optional[torch.Tensor]) -> Optional[str]:
    """Why :func:`decode_attention` cannot take these inputs (None when it can)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return "needs q (B, H, 1, D) and k, v (B, Hkv, L, D)"
    b, h, s, d = q.shape
    if s != 1:
        return f"{s} query positions (decode kernel: 1)"
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        return f"q {tuple(q.shape)} does not match k {tuple(k.shape)}"
    if d > MAX_HEAD_DIM or d & (d - 1):
        return f"head dim {d} (needs a power of two <= {MAX_HEAD_DIM})"
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if k.shape[2] == 0:
        return "an empty cache"
    tensors = [q, k, v] + ([mask] if mask is not None else [])
    if len({t.device for t in tensors}) != 1:
        return f"tensors on {sorted({str(t.device) for t in tensors})}"
    if mask is not None:
        if mask.dtype not in (torch.bool, q.dtype):  # what SDPA accepts
            return f"mask dtype {mask.dtype} (bool or q's {q.dtype})"
        target = (b, h, 1, k.shape[2])
        try:
            fits = torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            return f"mask {tuple(mask.shape)} does not broadcast to {target}"
    return None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float, sms: int = 132, **plan) -> torch.Tensor:
    """softmax(q K^T * scale + mask) V for q (B, H, 1, D), k and v (B, Hkv, L, D) with H a
    multiple of Hkv; ``mask`` None, bool or float, broadcastable to (B, H, 1, L). Returns
    (B, H, 1, D) in q's dtype. ``sms``: the GPU's SM count; ``plan``: :func:`launch_plan`'s
    keywords, for experiments (its defaults are the sweep's best or within 5 % of it)."""
    reason = unsupported_reason(q, k, v, mask)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    b, h, _, d = q.shape
    length = k.shape[2]
    if q.stride(3) != 1:
        q = q.contiguous()
    if k.stride(3) != 1:
        k = k.contiguous()
    if v.stride(3) != 1:
        v = v.contiguous()
    block_l = plan.get("block_l", BLOCK_L)
    n_split, per_split, num_warps = launch_plan(b * h, length, sms, **plan)
    kind = (NO_MASK if mask is None else BOOL_MASK if mask.dtype == torch.bool else ADD_MASK).value
    m = q if mask is None else mask.expand(b, h, 1, length)  # q: a pointer never read
    m_strides = (0, 0, 0) if mask is None else (m.stride(0), m.stride(1), m.stride(3))
    acc = torch.empty((b * h, n_split, d), device=q.device, dtype=torch.float32)
    ml = torch.empty((b * h, n_split, 2), device=q.device, dtype=torch.float32)
    out = torch.empty((b, h, 1, d), device=q.device, dtype=q.dtype)
    launch(_decode_attention_split_kernel, (b * h, n_split), q, k, v, m, acc, ml, h, length, h // k.shape[1],
           per_split, n_split, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2), *m_strides, float(scale),
           MASK=kind, D=d, BL=block_l, num_warps=num_warps)
    launch(_decode_attention_combine_kernel, (b * h,), acc, ml, out, n_split, out.stride(0), out.stride(1), h,
           D=d, NS=triton.next_power_of_2(n_split), num_warps=4)
    return out
