"""Where does the time of one decode step go? Per-kernel GPU time of the CUDA-graphed step.

    python3 benchmarks/experiments/profile_decode.py --shape llama2-7b --tma 0 1 0 1
    python3 benchmarks/experiments/profile_decode.py --shape llama2-7b --env PT2PASS_FUSE_X=0 PT2PASS_FUSE_X=1
    python3 benchmarks/experiments/profile_decode.py --shape llama2-7b --bf16 --env inductor.triton.enable_pdl=0 inductor.triton.enable_pdl=1

Builds the random bf16 LLaMA-shaped model of bench_e2e.py, ternarizes it (``method="rtn"``), and
for each ``--tma`` setting (``PT2PASS_TMA`` read when the step is traced, so each setting gets its
own compiled step in this process; ``--env`` sets any such variables, and ``inductor.NAME=V`` patches
torch._inductor.config while that setting's step compiles) times the decode step
exactly as generation runs it (compiled with CUDA graphs, one token at position ``--position``),
then profiles ``--steps`` replays and prints GPU time per step by kernel family and the top
kernels. ``--bf16`` profiles the bf16 model first (under each ``--env`` setting that patches
Inductor's config, since those change its kernels too). Wall time per step minus the kernels' sum is
what the GPU spends between kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_e2e import DEVICE, SHAPES, build_model, sync_time  # noqa: E402

import pt2pass  # noqa: E402
from pt2pass.decode import CachedDecoder, build_decode_graph, make_skeleton  # noqa: E402
from pt2pass.store import QuantStore  # noqa: E402

# (substring of the kernel name, family); the first match wins. Inductor's kernels ("triton_...")
# come before "attention": their names list the ops they feed, e.g. the RoPE prologue of SDPA is
# "triton_poi_fused__scaled_dot_product_cudnn_attention_...", and session 11's first A/B counted
# those as attention in the SDPA run and as fused ops in the other.
FAMILIES = [("gemv_group", "ternary GEMV, grouped (q/k/v, gate/up)"), ("quantize_x", "x quantize (dp2a)"),
            ("gemv", "ternary GEMV, single"), ("splitk", "split-K reduce"), ("gemm", "cuBLAS / GEMM"),
            ("triton_", "Inductor fused ops"), ("flash", "attention"), ("fmha", "attention"),
            ("attention", "attention"), ("copy", "copies"), ("Memcpy", "copies")]


def family(name: str) -> str:
    return next((fam for key, fam in FAMILIES if key in name), "other")


def step_fn(decoder: CachedDecoder, batch: int, position: int):
    step = decoder.compiled_step()
    tokens = torch.zeros((batch, 1), dtype=torch.long, device=DEVICE)
    positions = torch.tensor([position], device=DEVICE)

    def run():
        torch.compiler.cudagraph_mark_step_begin()
        return step(tokens, positions)
    return run


def profile_steps(run, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    if DEVICE != "cuda":
        return "    (CPU: no kernel profile)"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            per_name[e.name][0] += e.device_time_total
            per_name[e.name][1] += 1
    if not per_name:
        return "    (the profiler saw no kernels inside the CUDA-graph replays)"
    fams = defaultdict(lambda: [0.0, 0])
    for name, (us, n) in per_name.items():
        fams[family(name)][0] += us
        fams[family(name)][1] += n
    total = sum(us for us, _ in per_name.values()) / steps
    count = sum(n for _, n in per_name.values()) / steps
    lines = [f"    kernels: {total:.1f} us per step in {count:.0f} launches"]
    for fam, (us, n) in sorted(fams.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"    {us / steps:8.1f} us {n / steps:6.0f}x  {fam}")
    lines.append("    top kernels (us per step, launches per step, name):")
    for name, (us, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"    {us / steps:8.1f} us {n / steps:6.0f}x  {name[:100]}")
    return "\n".join(lines)


def measure(label, skeleton, store, args) -> float:
    graph = build_decode_graph(skeleton, store, args.batch, args.cache, group_siblings=True)
    decoder = CachedDecoder(graph, compile_decode=True)
    run = step_fn(decoder, args.batch, args.position)
    for _ in range(3):  # compile, record the CUDA graph, warm
        run()
    reps = 200
    wall = min(sync_time(lambda: [run() for _ in range(reps)]) for _ in range(3)) / reps
    print(f"{label}: {wall * 1e6:.1f} us per decode step = {args.batch / wall:.1f} tok/s", flush=True)
    print(profile_steps(run, args.steps, args.rows), flush=True)
    del decoder, graph
    torch._dynamo.reset()
    return wall


# Inductor's debug lines when it benchmarks a kernel's configs (torch 2.11-2.13); a kernel it finds
# in its autotune cache (keyed by the kernel's source and configs) is not benchmarked: no lines
AUTOTUNE_LOGGER = "torch._inductor.runtime.triton_heuristics"
AUTOTUNE_MESSAGES = ("Benchmark all input configs for %s, get:", "%s: %f, nreg %d, nspill %d, #shared-mem %s")


def log_autotuning() -> None:
    """Print the timing of every config Inductor benchmarks (which pick each trace makes)."""
    handler = logging.StreamHandler(sys.stdout)
    # the two messages, and the warnings and errors this logger would have shown anyway
    handler.addFilter(lambda record: record.msg in AUTOTUNE_MESSAGES or record.levelno >= logging.WARNING)
    handler.setFormatter(logging.Formatter("    inductor %(levelname)s: %(message)s"))
    logger = logging.getLogger(AUTOTUNE_LOGGER)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False  # torch's own handlers would print all of its debug lines too


@contextlib.contextmanager
def applied(setting: str):
    """Environment variables and ``inductor.NAME=V`` config patches of one ``--env`` setting, undone
    after (each setting on its own, not on top of the ones before)."""
    items = dict(item.split("=", 1) for item in setting.split(","))
    patches = {k[len("inductor."):]: _parsed(k[len("inductor."):], v) for k, v in items.items()
               if k.startswith("inductor.")}
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in items.items() if not k.startswith("inductor.")})
    try:
        with torch._inductor.config.patch(patches):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _parsed(name: str, value: str):
    """``value`` in the type of torch._inductor.config's ``name`` (e.g. triton.enable_pdl: bool)."""
    current = torch._inductor.config
    for part in name.split("."):
        if not hasattr(current, part):
            raise SystemExit(f"torch._inductor.config has no {name} in torch {torch.__version__}")
        current = getattr(current, part)
    return bool(int(value)) if isinstance(current, bool) else type(current)(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", type=int, default=512, help="static cache length")
    parser.add_argument("--position", type=int, default=256, help="the decoded token's position")
    parser.add_argument("--tma", nargs="+", default=["1"], help="PT2PASS_TMA values, one run each")
    parser.add_argument("--env", nargs="+", help="instead of --tma: settings 'VAR=V[,VAR=V]', one run each "
                                                 "(e.g. PT2PASS_FUSE_X=0 PT2PASS_FUSE_X=1)")
    parser.add_argument("--bf16", action="store_true", help="profile the bf16 model first")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's; fewer for a "
                                                   "quicker A/B, the per-layer kernels are the same)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--log-autotune", action="store_true",
                        help="print each config Inductor benchmarks, with its time (none: a cache hit)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.log_autotune:
        log_autotuning()
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke test", "torch", torch.__version__,
          flush=True)
    model = build_model(args.shape, args.layers)
    results = {}
    settings = args.env or [f"PT2PASS_TMA={tma}" for tma in args.tma]
    empty = QuantStore()
    if args.bf16:
        for i, setting in enumerate(s for s in settings if "inductor." in s):
            with applied(setting):
                results[f"bf16 {setting} #{i}"] = measure(f"bf16, {setting}", make_skeleton(model, empty), empty, args)
        if not any("inductor." in s for s in settings):
            results["bf16"] = measure("bf16", make_skeleton(model, empty), empty, args)
    qm = pt2pass.compile(model, config=pt2pass.CompileConfig(ternary=pt2pass.TernaryConfig(method="rtn")),
                         progress=False)
    del model
    for i, setting in enumerate(settings):
        with applied(setting):
            results[f"ternary {setting} #{i}"] = measure(f"ternary, {setting} (run {i})", qm.skeleton, qm.store, args)
    print("\n| run | us per step | tok/s |\n|---|---|---|")
    for label, wall in results.items():
        print(f"| {label} | {wall * 1e6:.1f} | {args.batch / wall:.1f} |")


if __name__ == "__main__":
    main()
