"""GPU checks of the lowering (run on the lent H100): opcheck, torch.compile inlines the Triton
kernels, torch.export save/load/run in a fresh process, AOTInductor package.

    PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py   # one PASS/FAIL line per check; exit 1 on FAIL
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
from pt2pass.lowering.format import pack_ternary  # noqa: E402
from pt2pass.lowering.reference import ternary_linear_reference  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
DEV = "cuda"
KERNELS = ("ternary_gemv_kernel", "ternary_gemm_kernel", "ternary_dequant_kernel")


def layer(n, k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    T = torch.randint(-1, 2, (n, k), generator=g)
    alpha = ((torch.rand(n, k // 128, generator=g) + 0.5) * 0.05).to(dtype)
    mu = (torch.randn(n, k // 128, generator=g) * 0.01).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    return [t.to(DEV) for t in (pack_ternary(T), alpha, mu, bias, torch.randperm(k, generator=g))]


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for i, ts in enumerate([layer(1024, 512, 1), layer(384, 1024, 2)]):
            for name, t in zip(("packed", "alpha", "mu", "bias", "perm"), ts):
                self.register_buffer(f"{name}{i}", t)

    def forward(self, x):
        h = OP(x, self.packed0, self.alpha0, self.mu0, None, None)
        return OP(torch.relu(h), self.packed1, self.alpha1, self.mu1, self.bias1, self.perm1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_opcheck():
    packed, alpha, mu, bias, perm = layer(256, 512, 3)
    cases = [((1, 512), torch.bfloat16, (bias, perm)), ((3, 7, 512), torch.float16, (None, None)),
             ((40, 512), torch.float32, (bias, perm)), ((600, 512), torch.bfloat16, (bias, perm))]
    for shape, dtype, extras in cases:  # gemv, gemm (split-K), gemm, dequantize + cuBLAS
        x = torch.randn(*shape, device=DEV, dtype=dtype)
        torch.library.opcheck(OP.default, (x, packed, alpha, mu, *extras))
        y = OP(x, packed, alpha, mu, *extras)
        ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                       None if extras[0] is None else extras[0].double(), extras[1])
        assert rel(y, ref) < 1e-2, rel(y, ref)


def check_compile_inlines_kernels():
    from torch._inductor.utils import run_and_get_code

    model = TwoLayers()
    for m in (1, 64):
        torch._dynamo.reset()
        x = torch.randn(m, 512, device=DEV, dtype=torch.bfloat16)
        compiled = torch.compile(model, fullgraph=True)
        y, codes = run_and_get_code(compiled, x)
        code = "\n".join(codes)
        found = [k for k in KERNELS if k in code]
        assert found, "no pt2pass kernel in the generated code"
        assert "ternary_linear_reference" not in code and "aten.linear" not in code
        assert rel(y, model(x)) < 1e-2
        print(f"  M={m}: generated code launches {found}")
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


_FRESH = """
import sys, torch
import pt2pass
ep = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[2]).cuda()
torch.save(ep.module()(x).cpu(), sys.argv[3])
"""


def check_export_round_trip():
    model = TwoLayers()
    x = torch.randn(2, 512, device=DEV, dtype=torch.bfloat16)
    ep = torch.export.export(model, (x,))
    n_ops = sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is OP.default)
    assert n_ops == 2, n_ops
    with tempfile.TemporaryDirectory() as d:
        p, xin, yout = os.path.join(d, "m.pt2"), os.path.join(d, "x.pt"), os.path.join(d, "y.pt")
        torch.export.save(ep, p)
        torch.save(x.cpu(), xin)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, "-c", _FRESH, p, xin, yout], check=True, env=env, timeout=600)
        y = torch.load(yout)
    assert torch.equal(y, ep.module()(x).cpu()), "fresh-process output differs"


def check_aoti():
    model = TwoLayers()
    x = torch.randn(5, 512, device=DEV, dtype=torch.bfloat16)
    ep = torch.export.export(model, (x,))
    with tempfile.TemporaryDirectory() as d:
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(d, "m.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        y = runner(x)
    assert rel(y, model(x)) < 1e-2


def main():
    failed = 0
    for check in (check_opcheck, check_compile_inlines_kernels, check_export_round_trip, check_aoti):
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
