"""Timing of ``pt2pass::ternary_linear`` against dense ``F.linear``, shared by ``pt2pass bench``
and ``benchmarks/bench_kernels.py``.

On CUDA a call is timed inside a CUDA graph that cycles through enough weight copies that the
L2 cache holds none of them (otherwise a repeated call reads its weight from L2 and looks faster
than decoding ever is). On CPU the op runs its plain-torch reference path (unpack the 2-bit codes,
dequantize, matmul), timed with ``time.perf_counter``; the report says which path ran.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .lowering.format import WEIGHTS_PER_WORD, dequantize, n_blocks, pack_ternary

log = logging.getLogger(__name__)

ROTATE_BYTES = 200e6  # > 4x the 50 MB L2 of an H100
SCALE_BLOCK = 128     # columns per (alpha, mu) block of the random layers
MAX_REL_ERR = 1e-2    # bf16 output rounding is ~2e-3; a wrong kernel is far above this


def parse_shape(text: str) -> Tuple[int, int]:
    """'NxK' (the benchmarks' --shapes) -> (N, K)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a shape is N x K written NxK, e.g. 4096x11008, got {text!r}")
    return int(parts[0]), int(parts[1])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against a float64 reference."""
    return ((out.double() - ref).norm() / ref.norm()).item()


def random_ternary_layer(n: int, k: int, device, scale_dtype=torch.bfloat16):
    """Random codes and scales of an (n, k) ternary layer: (T int8, packed, alpha, mu).
    K must be a multiple of 16 (the packing unit); a last partial scale block is allowed."""
    if k % WEIGHTS_PER_WORD:
        raise ValueError(f"in_features K={k} must be a multiple of {WEIGHTS_PER_WORD}")
    blocks = n_blocks(k, SCALE_BLOCK)
    T = torch.randint(-1, 2, (n, k), device=device, dtype=torch.int8)
    alpha = ((torch.rand(n, blocks, device=device) + 0.5) * 0.02).to(scale_dtype)
    mu = (torch.randn(n, blocks, device=device) * 0.005).to(scale_dtype)
    return T, pack_ternary(T), alpha, mu


def rotating_copies(tensors: Sequence[torch.Tensor], nbytes: float) -> List[tuple]:
    """Enough clones of ``tensors`` (``nbytes`` each set) to cover ROTATE_BYTES, at least 2."""
    r = max(2, math.ceil(ROTATE_BYTES / nbytes))
    return [tuple(t.clone() for t in tensors) for _ in range(r)]


def gemv_check_case(m: int, n: int, k: int, dtype, bias: bool, perm: bool, device):
    """A correctness case of the GEMV experiments: a random (n, k) layer with ``dtype`` scales,
    m rows of x whose columns span four decades (shuffled), an optional bias and SSR permutation,
    and the float64 reference. Returns (x, packed, alpha, mu, bias, perm, ref)."""
    _, packed, alpha, mu = random_ternary_layer(n, k, device, scale_dtype=dtype)
    x = torch.randn(m, k, device=device)
    x = (x * torch.logspace(-2, 2, k, device=device)[torch.randperm(k, device=device)]).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    p = torch.randperm(k, device=device) if perm else None
    w = dequantize(packed, alpha.double(), mu.double(), dtype=torch.float64)
    ref = (x.double()[:, p] if perm else x.double()) @ w.T + (b.double() if bias else 0)
    return x, packed, alpha, mu, b, p, ref


def attention_case(batch: int, heads: int, kv_heads: int, length: int, seen: Sequence[int], head_dim: int,
                   device, dtype=torch.bfloat16, kind: str = "bool", hidden: float = 0.0, positions: int = 1,
                   seed: int = 0):
    """A decode-attention case of the attention experiments and tests: q (batch, heads, positions,
    head_dim), a cache k, v (batch, kv_heads, length, head_dim) and a mask showing row i its first
    seen[i] slots: None (``kind="none"``, every slot seen), bool, or additive 0 / -inf (q's dtype),
    shaped (batch, 1, positions, length). The slots a mask hides hold ``hidden`` in k and v (NaN:
    a kernel that read one would show it). Returns (q, k, v, mask)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, positions, head_dim, generator=g, device=device).to(dtype)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g, device=device).to(dtype) for _ in range(2))
    if kind == "none":
        return q, k, v, None
    visible = torch.arange(length, device=device)[None, :] < torch.tensor(list(seen), device=device)[:, None]
    k.masked_fill_(~visible[:, None, :, None], hidden)
    v.masked_fill_(~visible[:, None, :, None], hidden)
    mask = visible[:, None, None, :].expand(batch, 1, positions, length)
    if kind == "additive":
        mask = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill(~mask, float("-inf"))
    return q, k, v, mask


def attention_reference(q, k, v, mask, scale=None) -> torch.Tensor:
    """float64 SDPA of an :func:`attention_case`: the KV heads repeated to the query heads (as
    HF's repeat_kv), hidden NaN slots as 0 (the mask gives them weight 0)."""
    rep = q.shape[1] // k.shape[1]
    kk = torch.nan_to_num(k.double()).repeat_interleave(rep, 1)
    vv = torch.nan_to_num(v.double()).repeat_interleave(rep, 1)
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=m, scale=scale)


def rotating_layers(n: int, k: int, device) -> Tuple[List[tuple], List[tuple], int]:
    """For timing an (n, k) layer with a cold L2: copies of one random bf16 weight (1-tuples) and of
    one random ternary layer ((packed, alpha, mu)), each set covering ROTATE_BYTES, and the bytes
    one ternary call reads (codes + bf16 alpha and mu)."""
    _, packed, alpha, mu = random_ternary_layer(n, k, device)
    dense = rotating_copies((torch.randn(n, k, device=device, dtype=torch.bfloat16),), n * k * 2)
    nbytes = packed.numel() * 4 + alpha.numel() * 4
    return dense, rotating_copies((packed, alpha, mu), nbytes), nbytes


def time_graph(calls: Sequence[Callable], n_calls: int, replays: int = 10) -> float:
    """Median time per call (s) of a CUDA graph that runs calls[i % len(calls)] n_calls times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (autotuning, lazy init) outside the capture
        for c in calls[: min(len(calls), 3)]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / n_calls)
    del g
    return statistics.median(times)


def checked_gpu_run(check: Callable[[str], bool], device: str = "cuda") -> float:
    """Preamble of the GPU benchmark scripts (which print: their output is the report): the GPU
    and versions, then ``check(device)``, correctness before any timing; exits with status 1 when
    it fails. Returns the start time."""
    import triton

    start = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if not check(device):
        print("correctness FAILED: no timing", flush=True)
        raise SystemExit(1)
    return start


def time_cpu(fn: Callable, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_path(device: torch.device, m: int, x: torch.Tensor, packed, alpha) -> str:
    """Which implementation ``pt2pass::ternary_linear`` runs for this call (see dispatch.py)."""
    if device.type != "cuda":
        return "CPU reference (plain torch: unpack, dequantize, matmul)"
    from .lowering.kernels import dispatch

    reason = dispatch.unsupported_reason(x, packed, alpha, SCALE_BLOCK)
    if reason is not None:
        return f"plain-torch reference on the GPU ({reason})"
    if m >= dispatch.DEQUANT_MIN_M:
        return "Triton dequantize + cuBLAS"
    gemv = dispatch.small_m_kernel(m, packed.shape[0], x.shape[-1], x.dtype, packed)
    return f"Triton {gemv}" if gemv is not None else "Triton GEMM"


@dataclass
class BenchRow:
    N: int
    K: int
    M: int
    t_ternary: float
    """Median seconds per ternary_linear call."""
    t_dense: float
    """Median seconds per F.linear call with the dequantized weight in the activation dtype."""
    err: float
    """Relative error of ternary_linear vs a float64 product with the dequantized weight."""
    path: str

    @property
    def speedup(self) -> float:
        return self.t_dense / self.t_ternary

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def bench_ternary_vs_dense(shapes: Iterable[Tuple[int, int]], ms: Iterable[int], device,
                           dtype: torch.dtype, repeats: int = 10,
                           progress: Optional[Callable[[BenchRow], None]] = None) -> List[BenchRow]:
    """Check, then time ``ternary_linear`` and ``F.linear`` for every (N, K) x M.

    Raises ValueError when the op's result is off by more than MAX_REL_ERR (timing a wrong
    kernel would be meaningless). ``progress(row)`` is called after each row.
    """
    device = torch.device(device)
    op = torch.ops.pt2pass.ternary_linear
    rows = []
    for n, k in shapes:
        _, packed, alpha, mu = random_ternary_layer(n, k, device, scale_dtype=dtype)
        w64 = dequantize(packed, alpha.double(), mu.double(), dtype=torch.float64)
        w = w64.to(dtype)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            err = rel_err(op(x, packed, alpha, mu), x.double() @ w64.T)
            if not err < MAX_REL_ERR:
                raise ValueError(f"ternary_linear {m}x{n}x{k} on {device}: relative error "
                                 f"{err:.2e} > {MAX_REL_ERR}")
            path = op_path(device, m, x, packed, alpha)
            if device.type == "cuda":
                tern = rotating_copies((packed, alpha, mu), packed.numel() * 4 + alpha.numel() * 4)
                dense = rotating_copies((w,), w.numel() * w.element_size())
                t_tern = time_graph([lambda p=p: op(x, *p) for p in tern], max(len(tern), 10))
                t_dense = time_graph([lambda d=d: F.linear(x, d[0]) for d in dense],
                                     max(len(dense), 10))
            else:
                t_tern = time_cpu(lambda: op(x, packed, alpha, mu), repeats)
                t_dense = time_cpu(lambda: F.linear(x, w), repeats)
            row = BenchRow(n, k, m, t_tern, t_dense, err, path)
            log.info("%dx%d M=%d: ternary %.1f us, dense %.1f us (%s)", n, k, m, t_tern * 1e6,
                     t_dense * 1e6, path)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def format_bench_table(rows: Sequence[BenchRow]) -> str:
    """A fixed-width table of the rows (times in microseconds)."""
    head = (f"{'N x K':>13} {'M':>5} {'ternary us':>11} {'dense us':>10} {'dense/tern':>10} "
            f"{'rel err':>8}  path")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.N:6d}x{r.K:<6d} {r.M:5d} {r.t_ternary * 1e6:11.1f} "
                     f"{r.t_dense * 1e6:10.1f} {r.speedup:10.2f} {r.err:8.1e}  {r.path}")
    return "\n".join(lines)
