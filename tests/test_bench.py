"""The shared set-up of the GPU kernel experiments (pt2pass/bench.py), checked on CPU."""
import pytest
import torch

from pt2pass.bench import ROTATE_BYTES, gemv_check_case, rel_err, rotating_layers
from pt2pass.lowering.reference import ternary_linear_reference


def test_gemv_check_case_reference_is_the_float64_layer_with_bias_and_permutation():
    torch.manual_seed(0)
    x, packed, alpha, mu, b, p, ref = gemv_check_case(3, 40, 256, torch.float16, True, True, "cpu")
    assert x.shape == (3, 256) and x.dtype == alpha.dtype == b.dtype == torch.float16
    assert sorted(p.tolist()) == list(range(256))
    assert x.abs().amax(0).max() / x.abs().amax(0).min() > 100  # columns span decades
    want = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(), b.double(), p)
    assert rel_err(want, ref) < 1e-12


def test_rotating_layers_cover_the_l2_flush_budget():
    dense, tern, nbytes = rotating_layers(512, 1024, "cpu")
    assert nbytes == 512 * 1024 // 4 + 2 * 2 * 512 * 8  # 2-bit codes + bf16 alpha and mu per 128
    assert len(tern) * nbytes >= ROTATE_BYTES and len(dense) * 512 * 1024 * 2 >= ROTATE_BYTES
    assert tern[0][0] is not tern[1][0] and torch.equal(tern[0][0], tern[1][0])


def test_op_path_names_the_kernel_the_dispatcher_runs():
    from pt2pass.bench import op_path, random_ternary_layer

    cuda = torch.device("cuda")  # op_path only reads shapes and dtypes: CPU tensors stand in
    _, packed, alpha, _ = random_ternary_layer(64, 256, "cpu")
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert op_path(torch.device("cpu"), 1, x, packed, alpha).startswith("CPU reference")
    assert [op_path(cuda, m, x, packed, alpha) for m in (1, 2, 4, 12, 300, 383, 384)] == [
        "Triton gemv_half2", "Triton gemv_packed", "Triton gemv_imma", "Triton GEMM", "Triton GEMM", "Triton GEMM",
        "Triton dequantize + cuBLAS"]
    assert op_path(cuda, 1, x.float(), packed, alpha) == "Triton gemv"
    _, odd_k, odd_alpha, _ = random_ternary_layer(64, 576, "cpu")
    assert "576 is not a multiple of 128" in op_path(cuda, 1, torch.zeros(1, 576), odd_k, odd_alpha)


def test_attention_case_hides_the_slots_its_mask_hides_and_the_reference_ignores_them():
    from pt2pass.bench import attention_case, attention_reference

    q, k, v, mask = attention_case(2, 4, 2, 10, [3, 10], 8, "cpu", torch.float32, "bool", hidden=float("nan"),
                                   positions=2)
    assert q.shape == (2, 4, 2, 8) and k.shape == v.shape == (2, 2, 10, 8) and mask.shape == (2, 1, 2, 10)
    assert k[0, :, 3:].isnan().all() and not k[0, :, :3].isnan().any() and not k[1].isnan().any()
    assert torch.equal(mask[0, 0, 1], torch.arange(10) < 3)
    _, _, _, additive = attention_case(2, 4, 2, 10, [3, 10], 8, "cpu", torch.float16, "additive")
    assert additive.dtype == torch.float16 and torch.equal(additive == 0, mask[:, :, :1])
    ref = attention_reference(q, k, v, mask)
    seen = torch.nn.functional.scaled_dot_product_attention(
        q[:1].double(), k[:1, :, :3].double().repeat_interleave(2, 1), v[:1, :, :3].double().repeat_interleave(2, 1))
    assert torch.isfinite(ref).all() and torch.allclose(ref[:1], seen)


def test_parse_shape_reads_nxk_and_names_bad_input():
    from pt2pass.bench import parse_shape

    assert parse_shape("4096x11008") == (4096, 11008) and parse_shape("28672X8192") == (28672, 8192)
    for bad in ("4096", "4096x", "4096x11008x2", "ax4"):
        with pytest.raises(ValueError, match="NxK"):
            parse_shape(bad)
