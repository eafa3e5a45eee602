"""GPU checks of the lowering (run on the lent H100): opcheck, torch.compile inlines the Triton
kernels, torch.export save/load/run in a fresh process, the decode attention op, AOTInductor package.

    PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py   # one PASS/FAIL line per check; exit 1 on FAIL
    PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py check_aoti   # only the named checks
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import pt2pass  # noqa: E402,F401
from pt2pass.bench import attention_case, attention_reference  # noqa: E402
from pt2pass.lowering.format import pack_ternary  # noqa: E402
from pt2pass.lowering.ops import compile_fresh  # noqa: E402
from pt2pass.lowering.reference import ternary_linear_reference  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
GROUP = torch.ops.pt2pass.ternary_linear_group
DEV = "cuda"
KERNELS = ("ternary_gemv_kernel", "ternary_gemv_half2_kernel", "ternary_gemv_dp2a_kernel", "_quantize_x_kernel",
           "ternary_gemv_packed_rows_kernel", "_prepack_x_kernel", "ternary_gemm_kernel", "ternary_dequant_kernel",
           "ternary_gemv_group_kernel", "_quantize_x_group_kernel", "ternary_gemv_imma_kernel", "_quantize_x_imma_kernel")
# the kernels each M must launch in TwoLayers (8192 x 4096: dp2a at M = 1, imma at M = 2, then
# 384 x 8192: half2 / the two-row GEMV; the group of 1024 + 512; M = 8: imma everywhere)
IMMA = {"ternary_gemv_imma_kernel", "_quantize_x_imma_kernel"}
EXPECTED = {1: {"ternary_gemv_dp2a_kernel", "_quantize_x_kernel", "ternary_gemv_half2_kernel",
                "ternary_gemv_group_kernel", "_quantize_x_group_kernel"},
            2: {"ternary_gemv_packed_rows_kernel", "_prepack_x_kernel", *IMMA},
            8: IMMA,
            64: {"ternary_gemm_kernel"}}


def layer(n, k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    T = torch.randint(-1, 2, (n, k), generator=g)
    alpha = ((torch.rand(n, k // 128, generator=g) + 0.5) * 0.05).to(dtype)
    mu = (torch.randn(n, k // 128, generator=g) * 0.01).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    return [t.to(DEV) for t in (pack_ternary(T), alpha, mu, bias, torch.randperm(k, generator=g))]


K = 4096  # TwoLayers' input features: 8192 x 4096 is above dispatch.DP2A_MIN_WEIGHTS


class TwoLayers(torch.nn.Module):
    """Two ternary Linears, then a group of two (bias and permutation each) reading x too."""

    def __init__(self):
        super().__init__()
        for i, ts in enumerate([layer(8192, K, 1), layer(384, 8192, 2), layer(1024, K, 5), layer(512, K, 6)]):
            for name, t in zip(("packed", "alpha", "mu", "bias", "perm"), ts):
                self.register_buffer(f"{name}{i}", t)

    def forward(self, x):
        h = OP(x, self.packed0, self.alpha0, self.mu0, None, None)
        y = OP(torch.relu(h), self.packed1, self.alpha1, self.mu1, self.bias1, self.perm1)
        a, b = GROUP(x, [self.packed2, self.packed3], [self.alpha2, self.alpha3], [self.mu2, self.mu3],
                     [self.bias2, self.bias3], [self.perm2, self.perm3])
        return torch.cat([y, a[..., :384] * b[..., :384]], dim=-1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_opcheck():
    packed, alpha, mu, bias, perm = layer(256, 512, 3)
    cases = [((1, 512), torch.bfloat16, (bias, perm)), ((2, 512), torch.float16, (bias, perm)),
             ((3, 7, 512), torch.float16, (None, None)), ((40, 512), torch.float32, (bias, perm)),
             ((600, 512), torch.bfloat16, (bias, perm)), ((4, 512), torch.bfloat16, (bias, perm)),
             ((2, 3, 512), torch.float16, (None, None))]
    # half2 gemv, packed gemv (2 rows), gemm (split-K), gemm, dequantize + cuBLAS, imma (4 and 6 rows)
    for shape, dtype, extras in cases:
        x = torch.randn(*shape, device=DEV, dtype=dtype)
        torch.library.opcheck(OP.default, (x, packed, alpha, mu, *extras))
        y = OP(x, packed, alpha, mu, *extras)
        ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                       None if extras[0] is None else extras[0].double(), extras[1])
        assert rel(y, ref) < 1e-2, rel(y, ref)
    big = layer(8192, K, 1)  # the dp2a GEMV (M = 1)
    for dtype, extras in ((torch.bfloat16, big[3:]), (torch.float16, (None, None))):
        x = torch.randn(1, K, device=DEV, dtype=dtype)
        torch.library.opcheck(OP.default, (x, *big[:3], *extras))
        ref = ternary_linear_reference(x.double(), *big[:2], big[2].double(),
                                       None if extras[0] is None else extras[0].double(), extras[1])
        assert rel(OP(x, *big[:3], *extras), ref) < 1e-2
    members = [layer(1024, 512, 5), layer(512, 512, 6)]
    for shape in ((1, 512), (1, 1, 512), (3, 512)):  # grouped GEMV (1 row), one call per member
        x = torch.randn(*shape, device=DEV, dtype=torch.bfloat16)
        args = (x, *map(list, zip(*members)))
        torch.library.opcheck(GROUP.default, args)
        for y, m in zip(GROUP(*args), members):
            assert rel(y, OP(x, *m)) < 1e-2, rel(y, OP(x, *m))


def check_compile_inlines_kernels():
    from torch._inductor.utils import run_and_get_code

    model = TwoLayers()
    for m in (1, 2, 8, 64):
        torch._dynamo.reset()
        x = torch.randn(m, K, device=DEV, dtype=torch.bfloat16)
        compiled = torch.compile(model, fullgraph=True)
        y, codes = run_and_get_code(compiled, x)
        code = "\n".join(codes)
        found = [k for k in KERNELS if k in code]
        assert EXPECTED[m] <= set(found), f"M={m}: expected {sorted(EXPECTED[m])}, generated code launches {found}"
        assert "ternary_linear_reference" not in code and "aten.linear" not in code
        assert rel(y, model(x)) < 1e-2
        print(f"  M={m}: generated code launches {found}")
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


ATTENTION = torch.ops.pt2pass.attention
ATTENTION_KERNELS = {"_decode_attention_split_kernel", "_decode_attention_combine_kernel"}


def check_attention():
    """pt2pass.attention (session 10): opcheck on the decode-kernel path (one query position, bool
    and additive masks, GQA) and the SDPA path (several positions), against float64 SDPA; then
    torch.compile(fullgraph) of a one-token call launches the two decode kernels."""
    from torch._inductor.utils import run_and_get_code

    def inputs(positions, hk, kind):
        return attention_case(2, 8, hk, 300, [120, 300], 128, DEV, kind=kind, positions=positions)

    for s, hk, kind in ((1, 8, "bool"), (1, 2, "bool"), (1, 8, "additive"), (5, 8, "bool"), (5, 2, "additive")):
        q, k, v, mask = inputs(s, hk, kind)
        args = (q, k, v, mask, None, hk != 8)
        torch.library.opcheck(ATTENTION.default, args)
        err = rel(ATTENTION(*args), attention_reference(q, k, v, mask))
        assert err < 1e-2, (s, hk, kind, err)
    torch._dynamo.reset()
    q, k, v, mask = inputs(1, 2, "bool")
    y, codes = run_and_get_code(torch.compile(lambda *a: ATTENTION(*a, None, True), fullgraph=True), q, k, v, mask)
    found = {name for name in ATTENTION_KERNELS if name in "\n".join(codes)}
    assert found == ATTENTION_KERNELS, f"generated code launches {sorted(found)}"
    assert rel(y, ATTENTION(q, k, v, mask, None, True)) < 1e-3


def check_decode_graph_attention():
    """The decode graph of a tiny GQA LLaMA (bf16, rtn codes) on CUDA, CUDA-graphed as generate
    runs it, with the decode attention kernel (the default) and with SDPA: the same logits, step
    by step over a prompt of 8 and 12 one-token steps (teacher-forced with SDPA's greedy tokens);
    a profiled step shows that the kernel ran, and no step ran without CUDA graphs."""
    from pt2pass.decode import build_decode_graph
    from pt2pass.lowering.lower_attention import ATTENTION_OP

    cfg, qm = tiny_gqa_llama()
    steps = [build_decode_graph(qm.skeleton, qm.store, 1, 64, decode_attention=flag) for flag in (False, True)]
    assert sum(n.target is ATTENTION_OP for n in steps[1].graph.nodes) == cfg.num_hidden_layers
    err = same_decode_logits(cfg, *steps, "_decode_attention_split_kernel")
    print(f"  decode graph, 13 steps: last rel err {err:.1e}; the split kernel ran", flush=True)


def tiny_gqa_llama():
    """(config, compiled model) of a 2-layer GQA LLaMA with random bf16 weights on the GPU, rtn codes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
    ternary = pt2pass.TernaryConfig(method="rtn", aga=False, compensation="none", order="natural")
    return cfg, pt2pass.compile(model, None, config=pt2pass.CompileConfig(ternary=ternary), progress=False)


def check_forward_and_export():
    """QuantizedCausalLM.forward's input checks (session 17) on the GPU and the lent torch: named
    errors in eager, none inside torch.compile(fullgraph) (a value check would break the graph);
    pt2pass.export from a one-row prompt runs at batch 3 (the example is widened)."""
    cfg, qm = tiny_gqa_llama()
    ids = torch.randint(0, cfg.vocab_size, (3, 7), device=DEV)
    for bad, match in ((ids[0], "2-D"), (ids + cfg.vocab_size, "vocab_size")):
        try:
            qm(bad)
        except ValueError as exc:
            assert match in str(exc), exc
        else:
            raise AssertionError(f"qm accepted bad ids ({match})")
    with torch.no_grad():
        want = qm(ids).logits
        got = torch.compile(qm, fullgraph=True)(ids).logits
        assert rel(got, want) < 1e-2, rel(got, want)
        ep = pt2pass.export(qm, ids[:1])
        assert rel(ep.module()(ids).logits, want) < 1e-2
    print("  eager checks named; compiled (fullgraph) and exported-from-one-row logits match at batch 3")


def same_decode_logits(cfg, base, other, kernel: str) -> float:
    """Decode graphs ``base`` and ``other`` CUDA-graphed as generate runs them: the same logits,
    step by step over a prompt of 8 and 12 one-token steps (teacher-forced with base's greedy
    tokens); a profiled step of ``other`` shows ``kernel`` ran, and no step ran without CUDA
    graphs. Returns the last step's relative error."""
    from pt2pass.decode import CachedDecoder

    torch._dynamo.utils.counters.clear()
    fns = [CachedDecoder(g).logits_fn(compile_decode=True) for g in (base, other)]
    ids = torch.randint(0, cfg.vocab_size, (1, 8), device=DEV)
    with torch.no_grad():
        for i in range(13):
            want, got = fns[0](ids, i == 0), fns[1](ids, i == 0)
            err = rel(got, want)
            assert err < 2e-2, f"step {i}: rel err {err:.2e}"
            ids = torch.cat([ids, want.argmax(-1, keepdim=True)], 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fns[1](ids, False)
            torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert any(kernel in n for n in names), sorted(names)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], "a step ran without CUDA graphs"
    return err


def check_fused_norm():
    """pt2pass.add_rms_norm_linear_group (session 16): opcheck and values against the unfused ops
    (one row: the add and RMSNorm inside the grouped GEMV's quantize launch; three rows: torch,
    then the group), then a tiny LLaMA's CUDA-graphed decode graph with and without FuseAddRMSNorm:
    the same logits step by step, and a profiled step shows the fused quantize kernel ran."""
    from pt2pass.decode import build_decode_graph
    from pt2pass.lowering.fuse_add_rms_norm import FUSED_OP
    from pt2pass.lowering.reference import rms_norm_reference

    members = [layer(1024, 512, 5), layer(512, 512, 6), layer(256, 512, 7)]
    for rows, extras in ((1, True), (1, False), (3, True)):
        a, b = (torch.randn(rows, 512, device=DEV, dtype=torch.bfloat16) * 8 for _ in range(2))
        w = torch.rand(512, device=DEV, dtype=torch.bfloat16) + 0.5
        packed, alpha, mu, bias, perm = map(list, zip(*members))
        if not extras:
            bias, perm = [None] * 3, [None] * 3
        args = (a, b, w, 1e-5, packed, alpha, mu, bias, perm)
        torch.library.opcheck(FUSED_OP, args)
        h, *ys = FUSED_OP(*args)
        assert torch.equal(h, a + b)
        x = rms_norm_reference(a + b, w, 1e-5)
        for y, ref in zip(ys, GROUP(x, packed, alpha, mu, bias, perm)):
            assert rel(y, ref) < 1e-2, (rows, extras, rel(y, ref))
    cfg, qm = tiny_gqa_llama()
    steps, saved = {}, os.environ.get("PT2PASS_FUSE_NORM")
    for flag in ("0", "1"):
        os.environ["PT2PASS_FUSE_NORM"] = flag
        steps[flag] = build_decode_graph(qm.skeleton, qm.store, 1, 64)
    if saved is None:
        del os.environ["PT2PASS_FUSE_NORM"]
    else:
        os.environ["PT2PASS_FUSE_NORM"] = saved
    assert sum(n.target is FUSED_OP for n in steps["1"].graph.nodes) == 2 * cfg.num_hidden_layers - 1
    err = same_decode_logits(cfg, steps["0"], steps["1"], "_add_norm_quantize_kernel")
    print(f"  fused decode graph, 13 steps: last rel err {err:.1e}; the fused quantize kernel ran", flush=True)


def check_padded_generate():
    """Left-padded prompts of three lengths in one batch on a tiny Mistral with a 16-token sliding
    window (bf16, rtn codes, CUDA graphs as generate runs them): every row's logits over 24 steps
    (past the window) match that prompt decoded alone (teacher-forced with the batch's tokens)."""
    from transformers import MistralConfig, MistralForCausalLM

    from pt2pass.decode import CachedDecoder, build_decode_graph

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=16)
    model = MistralForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
    ternary = pt2pass.TernaryConfig(method="rtn", aga=False, compensation="none", order="natural")
    qm = pt2pass.compile(model, None, config=pt2pass.CompileConfig(ternary=ternary), progress=False)
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), device=DEV) for n in (5, 12, 9)]
    ids = torch.zeros(3, 12, dtype=torch.long, device=DEV)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 12 - p.shape[1]:], mask[row, 12 - p.shape[1]:] = p, 1
    torch._dynamo.utils.counters.clear()
    batch = CachedDecoder(build_decode_graph(qm.skeleton, qm.store, 3, 64, padded=True)).logits_fn(True, mask)
    alone = [CachedDecoder(build_decode_graph(qm.skeleton, qm.store, 1, 64)).logits_fn(True) for _ in prompts]
    worst = 0.0
    with torch.no_grad():
        for i in range(24):
            got = batch(ids, i == 0)
            for row in range(3):
                worst = max(worst, rel(got[row:row + 1], alone[row](prompts[row], i == 0)))
                assert worst < 2e-2, f"step {i}, row {row}: rel err {worst:.2e}"
            token = got.argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], 1)
            prompts = [torch.cat([p, token[row:row + 1]], 1) for row, p in enumerate(prompts)]
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], "a step ran without CUDA graphs"
    print(f"  padded batch of 3, 24 steps past a 16-token window: worst rel err {worst:.1e}", flush=True)


_FRESH = """
import sys, torch
import pt2pass
ep = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[2]).cuda()
torch.save(ep.module()(x).cpu(), sys.argv[3])
"""


def check_export_round_trip():
    model = TwoLayers()
    x = torch.randn(2, K, device=DEV, dtype=torch.bfloat16)
    ep = torch.export.export(model, (x,))
    n_ops = sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is OP.default)
    assert n_ops == 2 and sum(n.target is GROUP.default for n in ep.graph.nodes) == 1, n_ops
    with tempfile.TemporaryDirectory() as d:
        p, xin, yout = os.path.join(d, "m.pt2"), os.path.join(d, "x.pt"), os.path.join(d, "y.pt")
        torch.export.save(ep, p)
        torch.save(x.cpu(), xin)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, "-c", _FRESH, p, xin, yout], check=True, env=env, timeout=600)
        y = torch.load(yout)
    assert torch.equal(y, ep.module()(x).cpu()), "fresh-process output differs"


# One AOTInductor round trip per subprocess (a crash in compiled C++ kills only that step);
# faulthandler prints where it died. argv: what ("linear": plain torch control, "ternary"), M.
_AOTI = r"""
import os, sys, tempfile, time, torch
sys.path.insert(0, os.environ["PT2PASS_ROOT"]); sys.path.insert(0, os.path.join(os.environ["PT2PASS_ROOT"], "benchmarks"))
from check_gpu_lowering import K, TwoLayers, rel
what, m = sys.argv[1], int(sys.argv[2])
model = TwoLayers() if what == "ternary" else torch.nn.Linear(K, 384).cuda().to(torch.bfloat16)
x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
ep = torch.export.export(model, (x,)); print("exported", flush=True)
d = tempfile.mkdtemp(); t = time.time()
path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(d, "m.pt2"))
print(f"compiled in {time.time() - t:.0f} s", flush=True)
runner = torch._inductor.aoti_load_package(path); print("loaded", flush=True)
y = runner(x); torch.cuda.synchronize(); print("ran", flush=True)
err = rel(y, model(x)); print(f"rel err {err:.2e}", flush=True)
assert err < 1e-2
"""


def check_aoti():
    env = dict(os.environ, PT2PASS_ROOT=ROOT)
    failed = []
    for what, m in (("linear", 5), ("ternary", 1), ("ternary", 5)):
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _AOTI, what, str(m)], env=env,
                           capture_output=True, text=True, timeout=400)
        tail = [l for l in (r.stdout + r.stderr).splitlines() if "Warning" not in l][-25:]
        print(f"  AOTI {what} M={m}: exit {r.returncode}\n    " + "\n    ".join(tail), flush=True)
        if r.returncode:
            failed.append(f"{what} M={m}")
    assert not failed, f"AOTInductor failed: {failed}"


def check_experts():
    """pt2pass.ternary_experts (session 22, written without a GPU): the grouped Triton GEMM against
    the per-expert loop at decode (2 rows) and prefill (4096 rows) sizes with sentinel rows and an
    idle expert, opcheck, and torch.compile with CUDA graphs (the tile table is built on the device:
    no host sync may break the capture)."""
    E, N, K = 8, 1024, 2048
    g = torch.Generator().manual_seed(7)
    T = torch.randint(-1, 2, (E, N, K), generator=g)
    packed = pack_ternary(T.reshape(-1, K)).reshape(E, N, K // 16).to(DEV)
    alpha = ((torch.rand(E, N, K // 128, generator=g) + 0.5) * 0.05).to(DEV, torch.bfloat16)
    mu = (torch.randn(E, N, K // 128, generator=g) * 0.01).to(DEV, torch.bfloat16)
    perm = torch.stack([torch.randperm(K, generator=g) for _ in range(E)]).to(DEV, torch.int32)
    op, loop = torch.ops.pt2pass.ternary_experts, torch.ops.pt2pass.ternary_experts_loop
    for rows, counts in ((2, [0, 1, 0, 0, 0, 1, 0, 0]), (4096, [700, 0, 500, 600, 520, 580, 640, 500])):
        offs = torch.tensor(counts, device=DEV).cumsum(0).to(torch.int32)
        x = torch.randn(rows, K, generator=g).to(DEV, torch.bfloat16)
        y, ref = op(x, offs, packed, alpha, mu, perm, 128), loop(x, offs, packed, alpha, mu, perm, 128)
        err = rel(y, ref)
        print(f"  experts rows={rows}: rel err {err:.2e}, sentinel rows zero: {bool((y[int(offs[-1]):] == 0).all())}")
        assert err < 1e-2 and bool((y[int(offs[-1]):] == 0).all())
        torch.library.opcheck(op.default, (x, offs, packed, alpha, mu, perm, 128))
        fn = compile_fresh(lambda x, offs: op(x, offs, packed, alpha, mu, perm, 128), mode="reduce-overhead")
        for _ in range(3):
            out = fn(x, offs)
        assert rel(out, ref) < 1e-2, rel(out, ref)


def main():
    failed = 0
    checks = (check_opcheck, check_compile_inlines_kernels, check_export_round_trip, check_attention,
              check_decode_graph_attention, check_fused_norm, check_padded_generate, check_forward_and_export,
              check_aoti, check_experts)
    only = sys.argv[1:]  # e.g. check_aoti: run just these
    for check in [c for c in checks if not only or c.__name__ in only]:
        t = time.time()
        try:
            check()
            print(f"PASS {check.__name__} ({time.time() - t:.0f} s)", flush=True)
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAIL {check.__name__} ({time.time() - t:.0f} s)\n{traceback.format_exc()}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
