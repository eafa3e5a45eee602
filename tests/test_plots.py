"""PNG plots of the report and of the ablation table."""
import json

import numpy as np
import pytest
import torch

from pt2pass.plots import (_column_blocks, _dodge, layer_position, read_ablation, write_plots)

PNG = b"\x89PNG\r\n\x1a\n"
KINDS = ("self_attn.q_proj", "mlp.down_proj")


def rows_and_perms(n_blocks=3, k=256):
    """Synthetic rows of ``n_blocks`` decoder blocks x KINDS; down_proj reordered by SSR."""
    rows, perms = [], {}
    for b in range(n_blocks):
        for kind in KINDS:
            fqn = f"model.layers.{b}.{kind}.weight"
            reordered = kind == "mlp.down_proj"
            rows.append({"layer": fqn, "shape": [64, k], "method": "pt2",
                         "E_x_itf": 2.0 + b, "E_x_aga": 1.5 + b,
                         "E_w_itf_history": [10.0, 8.0, 7.5 - 0.1 * b],
                         "frac_blocks_reordered": 1.0 if reordered else 0.0,
                         "mean_abs_shift": 40.0 if reordered else 0.0})
            perms[fqn] = torch.randperm(k, generator=torch.Generator().manual_seed(b)) \
                if reordered else None
    return rows, perms


def test_write_plots_writes_the_three_report_pngs(tmp_path):
    rows, perms = rows_and_perms()
    paths = write_plots(rows, tmp_path / "img", perms=perms, caption="synthetic")
    assert [p.name for p in paths] == ["itf_convergence.png", "aga_error.png", "block_order.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 20_000


def test_plots_without_their_data_are_skipped(tmp_path):
    rows = [{"layer": "model.layers.0.mlp.up_proj.weight", "shape": [8, 16], "method": "rtn",
             "E_w": 1.0}]
    assert write_plots(rows, tmp_path) == []


def test_layer_position():
    assert layer_position("model.layers.12.mlp.down_proj.weight") == (12, "mlp.down_proj")
    assert layer_position("lm_head.weight") == (None, "lm_head")


def test_column_blocks_of_natural_and_permuted_orders():
    assert _column_blocks(None, 6, 4).tolist() == [0, 0, 0, 0, 1, 1]
    # perm[i] = original column quantized at position i
    assert _column_blocks(torch.tensor([5, 0, 4, 1, 3, 2]), 6, 2).tolist() == [0, 1, 2, 2, 1, 0]


def test_column_blocks_refuses_a_non_permutation():
    with pytest.raises(ValueError, match="not a permutation of 0..3"):
        _column_blocks(torch.tensor([0, 1, 1, 3]), 4, 2)


def test_dodge_spreads_equal_bits_symmetrically_by_perplexity():
    xs = _dodge([2.27, 2.27, 2.32, 2.27], [600.0, 6000.0, 500.0, 16000.0])
    assert xs[2] == 2.32
    assert np.allclose(sorted(xs[i] for i in (0, 1, 3)), [2.264, 2.27, 2.276])
    assert xs[3] < xs[1] < xs[0]  # highest perplexity leftmost


def test_read_ablation_from_results_markdown():
    rows = {r["name"]: r for r in read_ablation("docs/results.md")}
    assert len(rows) == 12
    assert rows["full precision (fp32)"]["ppl"] == 33.6
    full = rows["PT²-LLM: ITF + AGA + GPTQ compensation + SSR"]
    assert (full["ppl"], full["bits"], full["bits_trit"]) == (506.4, 2.32, 1.89)
    assert rows["RTN ternary (TWN, symmetric)"]["ppl"] == 1_545_144.0


def test_read_ablation_json_and_plot(tmp_path):
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps([
        {"key": "fp", "name": "fp", "ppl": 33.6, "bits": 32.0, "bits_trit": 32.0},
        {"key": "full", "name": "full", "ppl": 506.4, "bits": 2.32, "bits_trit": 1.92},
        {"key": "itf", "name": "itf", "ppl": 602.8, "bits": 2.27, "bits_trit": 1.87}]))
    rows = read_ablation(path)
    assert [r["ppl"] for r in rows] == [33.6, 506.4, 602.8]
    paths = write_plots([], tmp_path / "img", rows, ablation_caption="test")
    assert [p.name for p in paths] == ["ablation_ppl_bits.png"]
    assert paths[0].read_bytes()[:8] == PNG


@pytest.mark.parametrize("name, content, message", [
    ("a.json", json.dumps([{"name": "x"}]), "not an ablation JSON"),
    ("a.md", "# no table here", "has no ablation table")])
def test_read_ablation_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_ablation(tmp_path / name)
