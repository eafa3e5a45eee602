"""pt2pass::ternary_experts: the grouped Triton GEMM (TRITON_INTERPRET=1) against the per-expert
reference, the device-side tile table, the registered op (opcheck) and its argument checks."""
import pytest
import torch

from pt2pass.lowering.format import dequantize, pack_ternary
from pt2pass.lowering.kernels.experts import experts_tiles, ternary_experts_triton
from pt2pass.lowering.reference import ternary_experts_reference


def random_experts(e, n, k, seed, perm):
    g = torch.Generator().manual_seed(seed)
    T = torch.randint(-1, 2, (e, n, k), generator=g)
    packed = pack_ternary(T.reshape(-1, k)).reshape(e, n, k // 16)
    alpha = (torch.rand(e, n, k // 128, generator=g) + 0.1).half()
    mu = (torch.randn(e, n, k // 128, generator=g) * 0.1).half()
    orders = torch.stack([torch.randperm(k, generator=g) for _ in range(e)]) if perm else None
    return packed, alpha, mu, orders


def test_reference_routes_each_row_to_its_expert_and_zeroes_the_rest():
    packed, alpha, mu, perm = random_experts(3, 24, 128, 0, perm=True)
    x = torch.randn(9, 128)
    offs = torch.tensor([2, 2, 7])  # expert 1 gets no row; rows 7-8 belong to none
    y = ternary_experts_reference(x, offs, packed, alpha, mu, perm, 128)
    for e, rows in ((0, slice(0, 2)), (2, slice(2, 7))):
        w = dequantize(packed[e], alpha[e], mu[e], 128, dtype=torch.float32)
        torch.testing.assert_close(y[rows], x[rows][:, perm[e]] @ w.T)
    assert torch.equal(y[7:], torch.zeros(2, 24))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("perm", [False, True], ids=["natural", "perm"])
@pytest.mark.parametrize("offs,rows", [([3, 3, 7, 9], 10), ([0, 20, 20, 37], 37), ([5, 5, 5, 5], 5)],
                         ids=["sentinel-row", "empty-first", "one-expert"])
@pytest.mark.parametrize("tile", [None, (64, 32)], ids=["decode-tile", "prefill-tile"])
def test_kernel_matches_the_reference(dtype, perm, offs, rows, tile):
    packed, alpha, mu, orders = random_experts(4, 40, 256, 1, perm)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    offs = torch.tensor(offs, dtype=torch.int32)
    y = ternary_experts_triton(x, offs, packed, alpha, mu, None if orders is None else orders.int(), 128, tile)
    ref = ternary_experts_reference(x.double(), offs, packed, alpha, mu, orders, 128)
    assert y.dtype == dtype and y.shape == ref.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.equal(y[int(offs[-1]):], torch.zeros_like(y[int(offs[-1]):]))


def test_tile_table_covers_each_experts_rows_once():
    offs = torch.tensor([3, 3, 8, 9])
    expert, row0, end = experts_tiles(offs, 10, 2)
    # a program masks its BM = 2 rows from row0 to its expert's end
    covered = [(int(e), r) for e, a, b in zip(expert, row0, end) for r in range(int(a), min(int(a) + 2, int(b)))]
    assert covered == [(0, 0), (0, 1), (0, 2), (2, 3), (2, 4), (2, 5), (2, 6), (2, 7), (3, 8)]
    assert len(expert) == 5 + 4  # ceil(10 / 2) + experts: an upper bound known without a sync


def test_registered_op_passes_opcheck_and_checks_its_arguments():
    packed, alpha, mu, perm = random_experts(2, 16, 128, 3, perm=True)
    x, offs = torch.randn(5, 128), torch.tensor([2, 5])
    torch.library.opcheck(torch.ops.pt2pass.ternary_experts.default,
                          (x, offs, packed, alpha, mu, perm.int(), 128))
    w = [dequantize(packed[e], alpha[e], mu[e], 128, dtype=torch.float32) for e in range(2)]
    dense = torch.cat([x[:2][:, perm[0]] @ w[0].T, x[2:][:, perm[1]] @ w[1].T])
    torch.testing.assert_close(torch.ops.pt2pass.ternary_experts(x, offs, packed, alpha, mu, perm, 128), dense)
    with pytest.raises(RuntimeError, match="one int32/int64 cumulative row count per expert"):
        torch.ops.pt2pass.ternary_experts(x, torch.tensor([5]), packed, alpha, mu, perm, 128)
    with pytest.raises(RuntimeError, match="perm must be"):
        torch.ops.pt2pass.ternary_experts(x, offs, packed, alpha, mu, perm[0], 128)
    with pytest.raises(RuntimeError, match="x has 64 features"):
        torch.ops.pt2pass.ternary_experts(x[:, :64], offs, packed, alpha, mu, None, 128)


def test_the_host_loop_is_kept_out_of_cuda_graphs():
    """The CPU / fallback loop reads offs on the host: tagged so that Inductor's CUDA graphs leave it out."""
    assert torch.Tag.cudagraph_unsafe in torch.ops.pt2pass.ternary_experts_loop.default.tags
