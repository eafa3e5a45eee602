"""Kernel experiment (GPU): launch parameters of the split-cache decode attention.

    python3 benchmarks/experiments/sweep_decode_attention.py     # on the device machine

For each decode shape and each (cache slots per block, warps, programs per SM the splits aim
at): the error against the float64 reference, then the median time per layer of CUDA-graph
replays over 32 layers' caches (bench_decode_attention.py's timing), next to SDPA. Session 11
also swept loading V together with K (before the scores): slower at 64 slots, dropped.
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from pt2pass.bench import attention_reference, rel_err, time_graph  # noqa: E402
from pt2pass.lowering.kernels.decode_attention import decode_attention  # noqa: E402

from bench_decode_attention import LAYERS, shapes_with_sdpa_times  # noqa: E402

CONFIGS = list(itertools.product((16, 32, 64), (2, 4), (2, 4)))


def main():
    dev = "cuda"
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}, {sms} SMs")
    print("| shape | BL | warps | programs/SM | rel err | us per layer | vs SDPA |\n|---|---|---|---|---|---|---|")
    for name, shape, layers, t_sdpa in shapes_with_sdpa_times(dev):
        d = shape[-1]
        print(f"| {name} | SDPA | | | | {t_sdpa * 1e6:.1f} | 1.00x |", flush=True)
        ref = attention_reference(*layers[0])
        for bl, warps, per_sm in CONFIGS:
            kw = dict(programs_per_sm=per_sm, block_l=bl, num_warps=warps)
            err = rel_err(decode_attention(*layers[0], d ** -0.5, sms, **kw), ref)
            t = time_graph([lambda a=a: decode_attention(*a, d ** -0.5, sms, **kw) for a in layers], LAYERS)
            print(f"| {name} | {bl} | {warps} | {per_sm} | {err:.1e} | {t * 1e6:.1f} | "
                  f"{t_sdpa / t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
