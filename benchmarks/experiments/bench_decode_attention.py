"""Kernel experiment (GPU): the split-cache decode attention (kernels/decode_attention.py) against
torch's SDPA on the decode step's shapes.

    python3 benchmarks/experiments/bench_decode_attention.py     # on the device machine

Correctness first (float64 SDPA reference, bool and additive masks, MHA and GQA, rows that see
1 / part / all of the cache), then per shape the median of CUDA-graph replays over 32 layers'
caches (as one decode step reads them): SDPA as the decode graph calls it (K/V repeated to the
query heads for GQA, as HF's repeat_kv does; the backend torch picks) against pt2pass.attention,
which reads only the visible slots.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401  (registers torch.ops.pt2pass)
from pt2pass.bench import attention_case, attention_reference, checked_gpu_run, rel_err, time_graph  # noqa: E402

ATTENTION = torch.ops.pt2pass.attention
# (name, batch, query heads, kv heads, cache slots, visible slots, head dim)
SHAPES = [("llama2-7b b1", 1, 32, 32, 512, 257, 128), ("llama2-7b b1 full", 1, 32, 32, 512, 512, 128),
          ("llama2-7b b8", 8, 32, 32, 512, 257, 128), ("llama3-8b b1", 1, 32, 8, 512, 257, 128),
          ("llama3-8b b8", 8, 32, 8, 512, 257, 128)]
LAYERS = 32


def sdpa_as_graph(q, k, v, mask):
    """SDPA as the decode graph calls it: HF's repeat_kv for GQA, then the backend torch picks."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def shapes_with_sdpa_times(dev):
    """Per decode shape of SHAPES: (name, its tuple, 32 layers' attention inputs, SDPA's median
    time per layer in s), the layers' memory freed before the next shape's."""
    for name, *shape in SHAPES:
        b, h, hk, length, seen, d = shape
        layers = [attention_case(b, h, hk, length, [seen] * b, d, dev, seed=i) for i in range(LAYERS)]
        yield name, shape, layers, time_graph([lambda a=a: sdpa_as_graph(*a) for a in layers], LAYERS)
        layers.clear()
        torch.cuda.empty_cache()


def check(dev) -> bool:
    ok = True
    for b, h, hk, length, seen, kind in [(2, 32, 32, 512, [1, 300], "bool"), (3, 32, 8, 512, [512, 64, 129], "bool"),
                                         (2, 8, 8, 200, [200, 13], "additive"), (1, 4, 1, 64, [64], "bool"),
                                         (2, 4, 4, 96, [0, 96], "bool")]:  # a row that sees nothing: 0
        for dtype in (torch.bfloat16, torch.float16):
            q, k, v, mask = attention_case(b, h, hk, length, seen, 128, dev, dtype, kind, hidden=float("nan"))
            out = ATTENTION(q, k, v, mask, None, hk != h)
            err = rel_err(out, attention_reference(q, k, v, mask))
            good = err < 1e-2 and bool(torch.isfinite(out).all())
            ok &= good
            print(f"check b={b} h={h}/{hk} L={length} seen={seen} {kind} {dtype}: rel err {err:.2e} "
                  f"{'ok' if good else 'FAIL'}", flush=True)
    return ok


def main():
    dev = "cuda"
    checked_gpu_run(check, dev)
    print("\n| decode step shape | SDPA per layer (us) | pt2pass.attention per layer (us) | speed-up | "
          "x 32 layers saved (us) |\n|---|---|---|---|---|")
    for name, (b, h, hk, length, seen, d), layers, t_sdpa in shapes_with_sdpa_times(dev):
        t_ours = time_graph([lambda a=a: ATTENTION(*a, None, hk != h) for a in layers], LAYERS)
        print(f"| {name} (cache {length}, visible {seen}) | {t_sdpa * 1e6:.1f} | {t_ours * 1e6:.1f} | "
              f"{t_sdpa / t_ours:.2f}x | {(t_sdpa - t_ours) * 1e6 * LAYERS:.0f} |", flush=True)


if __name__ == "__main__":
    main()
