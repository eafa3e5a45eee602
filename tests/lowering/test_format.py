"""The packed ternary format: exact round trip, block-planar bit positions, corruption, dequantize."""
import pytest
import torch

from pt2pass.lowering.format import (FORMAT_VERSION, PackedTernary, dequantize, pack_ternary,
                                     unpack_codes, unpack_ternary)


@pytest.mark.parametrize("n,k", [(1, 16), (3, 128), (5, 256), (4, 576), (2, 64), (7, 1024)])
def test_pack_unpack_round_trip_is_exact(n, k):
    T = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = pack_ternary(T)
    assert packed.dtype == torch.int32 and packed.shape == (n, k // 16) and packed.is_contiguous()
    assert torch.equal(unpack_ternary(packed), T)
    assert torch.equal(unpack_codes(packed), T)


def test_block_planar_bit_positions():
    """Column 128 g + 8 i + j of a full group sits in word 8 g + j at bits 2 i (format version 2)."""
    assert FORMAT_VERSION == 2
    T = torch.randint(-1, 2, (3, 256 + 64))
    packed = pack_ternary(T)
    for col in [0, 1, 7, 8, 9, 127, 128, 200, 255]:
        g, r = divmod(col, 128)
        i, j = divmod(r, 8)
        assert torch.equal(((packed[:, 8 * g + j] >> (2 * i)) & 3) - 1, T[:, col].to(torch.int32))
    # the partial last group (64 columns = 4 words): column 256 + 4 i + j in word 16 + j, bits 2 i
    for col in [256, 259, 260, 319]:
        i, j = divmod(col - 256, 4)
        assert torch.equal(((packed[:, 16 + j] >> (2 * i)) & 3) - 1, T[:, col].to(torch.int32))


def test_code_3_is_rejected_as_corruption():
    packed = pack_ternary(torch.zeros(2, 32, dtype=torch.int8))
    bad = packed.clone()
    bad[1, 1] |= 3 << 6  # a 0 code (bits 01) becomes 11
    with pytest.raises(ValueError, match="corrupted"):
        unpack_ternary(bad)


@pytest.mark.parametrize("bad", [torch.tensor([[0, 2]]), torch.full((1, 16), 2), torch.ones(2, 10)])
def test_pack_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        pack_ternary(bad)


def test_unpack_rejects_wrong_dtype_and_width():
    packed = pack_ternary(torch.zeros(2, 32, dtype=torch.int8))
    with pytest.raises(ValueError):
        unpack_ternary(packed.to(torch.int64))
    with pytest.raises(ValueError):
        unpack_ternary(packed, in_features=48)


@pytest.mark.parametrize("k,block", [(256, 128), (576, 128), (192, 64)])
def test_dequantize_equals_alpha_t_plus_mu(k, block):
    n = 5
    T = torch.randint(-1, 2, (n, k))
    nb = -(-k // block)
    alpha, mu = torch.rand(n, nb) + 0.1, torch.randn(n, nb)
    w = dequantize(pack_ternary(T), alpha, mu, block)
    cols = torch.arange(k) // block
    assert torch.equal(w, alpha[:, cols] * T.float() + mu[:, cols])


def test_packed_ternary_undoes_the_permutation():
    torch.manual_seed(0)
    n, k = 4, 256
    T = torch.randint(-1, 2, (n, k))
    alpha, mu, perm = torch.rand(n, 2) + 0.1, torch.randn(n, 2), torch.randperm(k)
    layer = PackedTernary(pack_ternary(T), alpha, mu, perm=perm)
    x = torch.randn(3, k)
    permuted = x[:, perm] @ dequantize(layer.packed, alpha, mu).T
    torch.testing.assert_close(x @ layer.dequantize().T, permuted, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [5, 64, 576, 577])
def test_trit_packing_round_trip_and_size(k):
    from pt2pass.lowering.format import pack_trits, unpack_trits

    T = torch.randint(-1, 2, (7, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    data = pack_trits(T)
    assert data.dtype == torch.uint8 and data.shape == (7, -(-k // 5))
    assert torch.equal(unpack_trits(data, k), T)


@pytest.mark.parametrize("n,k", [(0, 10), (3, 0), (0, 0)])
def test_trit_packing_of_empty_matrices(n, k):
    from pt2pass.lowering.format import pack_trits, unpack_trits

    data = pack_trits(torch.zeros(n, k, dtype=torch.int8))
    assert data.shape == (n, -(-k // 5))
    assert unpack_trits(data, k).shape == (n, k)


def test_trit_packing_rejects_corruption():
    from pt2pass.lowering.format import pack_trits, unpack_trits

    data = pack_trits(torch.zeros(2, 10, dtype=torch.int8))
    data[1, 0] = 250
    with pytest.raises(ValueError, match="byte value above 242"):
        unpack_trits(data, 10)
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_trits(data.to(torch.int32), 10)
