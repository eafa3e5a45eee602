"""Random shapes, dtypes and layouts through the kernel dispatcher, run by the Triton interpreter
on CPU tensors, against a float64 reference (the generator is shared with the CUDA sweep
benchmarks/fuzz_kernels.py)."""
import pytest
import torch

from pt2pass.lowering.kernels import dispatch
from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.fuzz import (DEQUANT_MIN_M, GEMV_MAX_M, LARGE, SMALL,
                                           FuzzCase, draw_cases, run_case)

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")

CASES = draw_cases(24, seed=2030, limits=SMALL)


def _case_id(i, c):
    return f"{i}-{str(c.dtype)[6:]}-m{c.m}-n{c.n}-k{c.k}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(i, c) for i, c in enumerate(CASES)])
def test_dispatcher_matches_float64_reference(case):
    err, problem = run_case(case)
    assert problem is None, f"{case.describe()}: {problem}"


def _kernel_path(case, dp2a_min_weights=dispatch.DP2A_MIN_WEIGHTS):
    """The kernel the dispatcher runs for ``case`` (None: the reference fallback)."""
    if case.k % 128 or case.block_size != 128:
        return None
    big = case.n * case.k >= dp2a_min_weights
    if case.dtype != torch.float32:
        if case.m == 1:
            return "gemv_dp2a" if big else "gemv_half2"
        if 3 <= case.m <= 8 or (case.m <= 16 and big):
            return "gemv_imma"
        if case.m == 2:
            return "gemv_packed"
    elif case.m <= GEMV_MAX_M:
        return "gemv"
    return "dequant" if case.m >= DEQUANT_MIN_M else "gemm"


PATHS = ("gemv", "gemv_half2", "gemv_packed", "gemv_imma", "gemm", "dequant")  # gemv_dp2a: below


def test_every_kernel_path_is_fuzzed(monkeypatch):
    assert {_kernel_path(c) for c in CASES} == {*PATHS, None}
    calls = []
    for name in PATHS:
        real = getattr(dispatch, f"ternary_{name}")
        monkeypatch.setattr(dispatch, f"ternary_{name}", lambda *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    for path in PATHS:  # the prediction above matches the dispatcher
        calls.clear()
        run_case(next(c for c in CASES if _kernel_path(c) == path))
        assert calls == [path]


@pytest.mark.parametrize("case", [c for c in CASES if _kernel_path(c) == "gemv_half2"],
                         ids=lambda c: f"m{c.m}-n{c.n}-k{c.k}-{str(c.dtype)[6:]}")
def test_m1_cases_through_the_dp2a_gemv(case, monkeypatch):
    # the dispatcher sends M = 1 there from 32 M weights, beyond the interpreter's sizes: lower the bar
    monkeypatch.setattr(dispatch, "DP2A_MIN_WEIGHTS", 1)
    assert _kernel_path(case, dp2a_min_weights=1) == "gemv_dp2a"
    calls = []
    real = dispatch.ternary_gemv_dp2a
    monkeypatch.setattr(dispatch, "ternary_gemv_dp2a", lambda *a, **k: calls.append(1) or real(*a, **k))
    err, problem = run_case(case)
    assert problem is None, f"{case.describe()}: {problem}"
    assert calls == [1]


def test_cases_cover_the_advertised_space():
    assert {c.dtype for c in CASES} == {torch.float32, torch.bfloat16, torch.float16}
    assert {c.layout for c in CASES} == {"contiguous", "row_padded", "transposed"}
    assert {len(c.lead) for c in CASES} == {1, 2} and {c.bias for c in CASES} == {False, True}
    assert {c.perm for c in CASES} == {False, True}
    assert any(c.k % 128 for c in CASES) and any(c.m >= DEQUANT_MIN_M for c in CASES)
    assert all(c.k % 16 == 0 and c.k <= SMALL.max_k and c.n <= SMALL.max_n for c in CASES)


def test_generator_is_deterministic_and_reaches_the_large_sizes():
    assert draw_cases(24, seed=2030, limits=SMALL) == CASES
    big = draw_cases(256, seed=5, limits=LARGE)  # fuzz_kernels.py's default
    assert max(c.m for c in big) > 2048 and max(c.n * c.k for c in big if c.m == 1) > dispatch.DP2A_MIN_WEIGHTS
    assert max(c.k for c in big) > 4096 and all(c.k <= 8192 and c.m <= 4096 for c in big)


def test_a_wrong_kernel_is_caught(monkeypatch):
    """The check itself: a kernel that drops the bias must fail the case."""
    case = FuzzCase(lead=(3,), n=16, k=128, dtype=torch.float32, scale_dtype=torch.float16,
                    block_size=128, bias=True, perm=False, layout="contiguous", seed=1)
    assert run_case(case)[1] is None
    real = dispatch.ternary_linear_triton
    monkeypatch.setattr("pt2pass.lowering.kernels.fuzz.ternary_linear_triton",
                        lambda x, p, a, m, b, *rest: real(x, p, a, m, None, *rest))
    err, problem = run_case(case)
    assert problem is not None and problem.startswith("relative error") and err > 1e-2
