"""Kernel experiment (GPU): the tensor-core small-M kernel of tc_small_m.py against the committed
dispatcher and bf16 F.linear, M = 1, 4, 16, the seven shapes of bench_kernels.py.

    python3 benchmarks/experiments/compare_small_m.py          # on the device machine

The session-2 run also timed the committed GEMV with its K loop written as
``tl.range(b_lo, b_hi, NBT, num_stages=3 or 4)`` (a one-line change, not kept): see docs/results.md.
"""
import math, statistics, sys, time, os, itertools
sys.path.insert(0, os.path.dirname(__file__))
import torch, triton
import torch.nn.functional as F
import pt2pass  # noqa
from pt2pass.lowering.kernels import dispatch
from pt2pass.lowering.kernels.common import splitk_reduce
from pt2pass.lowering.format import pack_ternary
import tc_small_m as tc3

dev = "cuda"
OP = torch.ops.pt2pass.ternary_linear

def time_graph(calls, n_calls, replays=10):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[:3]: c()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls): calls[i % len(calls)]()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / n_calls)
    return statistics.median(ts)

def tc_call(x, w, al, mu, out, cfg, split):
    m, k = x.shape; n = w.shape[0]; nb = k // 128
    bps = triton.cdiv(nb, split); split = triton.cdiv(nb, bps)
    bn, warps, stages = cfg
    if split == 1:
        tc3.tc_kernel[(triton.cdiv(n, bn), 1)](x, w, al, mu, out, m, n, k // 16, nb, x.stride(0), bps, tc3.ONE2,
                                               SPLIT_OUT=False, BN=bn, BM=16, NSTAGE=stages, num_warps=warps, num_stages=stages)
    else:
        ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
        tc3.tc_kernel[(triton.cdiv(n, bn), split)](x, w, al, mu, ws, m, n, k // 16, nb, x.stride(0), bps, tc3.ONE2,
                                                   SPLIT_OUT=True, BN=bn, BM=16, NSTAGE=stages, num_warps=warps, num_stages=stages)
        splitk_reduce(ws, None, out)
    return out

def splits_for(n, bn, nb, sms=132):
    ctas = triton.cdiv(n, bn)
    base = 1 if ctas >= 2 * sms else max(1, min(triton.cdiv(2 * sms, ctas), nb // 4))
    return sorted({1, base, max(1, base // 2), min(nb, base * 2)})

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
MS = [1, 4, 16]
TC_CFGS = [(64, 4, 4), (128, 4, 3), (128, 4, 4), (128, 4, 6), (128, 8, 4), (256, 8, 3), (256, 8, 4)]
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
t0 = time.time()
summary = []
for n, k in SHAPES:
    T = torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8)
    al = ((torch.rand(n, k // 128, device=dev) + 0.5) * 0.02).to(torch.bfloat16)
    mu = (torch.randn(n, k // 128, device=dev) * 0.005).to(torch.bfloat16)
    wp = pack_ternary(T); wt = tc3.pack_tc(T)
    w64 = (al.double().repeat_interleave(128, 1) * T.double() + mu.double().repeat_interleave(128, 1))
    w16 = w64.to(torch.bfloat16)
    r = max(2, math.ceil(200e6 / (wp.numel() * 4)))
    cur = [(wp.clone(), al.clone(), mu.clone()) for _ in range(r)]
    tcs = [(wt.clone(), al.clone(), mu.clone()) for _ in range(r)]
    dense = [w16.clone() for _ in range(max(2, math.ceil(200e6 / (w16.numel() * 2))))]
    nb = k // 128
    for m in MS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ w64.T
        out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        def err(o): return ((o.double() - ref).norm() / ref.norm()).item()
        t_bf = time_graph([lambda w=w: F.linear(x, w) for w in dense], max(len(dense), 10))
        e_cur = err(OP(x, wp, al, mu))
        t_cur = time_graph([lambda p=p: OP(x, *p) for p in cur], max(len(cur), 10))
        best = (1e9, None)
        for cfg in TC_CFGS:
            for sp in splits_for(n, cfg[0], nb):
                try:
                    e = err(tc_call(x, wt, al, mu, out, cfg, sp))
                    if not e < 1e-2:
                        print(f"  TC WRONG {n}x{k} M={m} cfg={cfg} split={sp} err={e:.2e}"); continue
                    t = time_graph([lambda p=p: tc_call(x, *p, out, cfg, sp) for p in tcs], max(len(tcs), 10))
                except Exception as ex:
                    print(f"  tc {cfg} split {sp} failed: {type(ex).__name__}: {str(ex)[:200]}"); continue
                if t < best[0]: best = (t, (cfg, sp, e))
        floor = (wp.numel() * 4 + 2 * al.numel() * 2) / 3.0e12
        line = (f"{n:6d}x{k:<6d} M={m:<3d} bf16 {t_bf*1e6:7.1f}  cur {t_cur*1e6:7.1f} (x{t_bf/t_cur:4.2f}, err {e_cur:.1e})  "
                f"tc {best[0]*1e6:7.1f} (x{t_bf/best[0]:4.2f}) {best[1]}  "
                + f"floor {floor*1e6:5.1f}  tc%bw {floor/best[0]*100:3.0f}")
        print(line, flush=True)
    del cur, tcs, dense
    torch.cuda.empty_cache()
    print(f"[{time.time()-t0:.0f}s]", flush=True)
