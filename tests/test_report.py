"""The per-layer report: text table, JSON file, and the ITF history the quantizer records."""
import json
import math

import pytest
import torch

from pt2pass.config import TernaryConfig
from pt2pass.quant import itf, ternarize_weight
from pt2pass.report import format_layer_table, json_safe, read_report, write_report_json

PT2_ROW = {"layer": "model.layers.3.mlp.down_proj.weight", "shape": [576, 1536], "method": "pt2",
           "E_w_itf": 12.5, "E_w_aga": 13.0, "E_x_itf": 2.0, "E_x_aga": 1.5, "E_w": 13.5, "E_x": 1.25,
           "itf_iters_mean": 6.25, "itf_iters_max": 9, "frac_blocks_reordered": 0.75,
           "mean_abs_shift": 101.4, "seconds": 0.5, "E_w_itf_history": [20.0, 14.0, 12.5]}
RTN_ROW = {"layer": "model.layers.0.self_attn.q_proj.weight", "shape": [576, 576],
           "method": "rtn", "E_w": 3.0, "mean_abs_shift": 0.0, "frac_blocks_reordered": 0.0,
           "seconds": 0.25}


def cells(table: str, name: str):
    line = next(line for line in table.splitlines() if line.startswith(name))
    return line[len(name):].split()


def test_table_columns_of_a_pt2_row():
    table = format_layer_table([PT2_ROW])
    assert cells(table, "model.layers.3.mlp.down_proj ") == [
        "576x1536", "12.5", "13", "2", "1.5", "-25.0%", "13.5", "1.25", "6.2/9", "75%", "101.4",
        "0.50"]
    header = table.splitlines()[0].split("  ")
    assert [h.strip() for h in header if h.strip()][:3] == ["layer", "shape", "E_w ITF"]


def test_table_shows_missing_statistics_as_dashes_and_sums_totals():
    table = format_layer_table([PT2_ROW, RTN_ROW], legend=False)
    assert cells(table, "model.layers.0.self_attn.q_proj ") == [
        "576x576", "-", "-", "-", "-", "-", "3", "-", "-", "0%", "0.0", "0.25"]
    assert cells(table, "total (2 layers) ") == [
        "-", "12.5", "13", "2", "1.5", "-25.0%", "16.5", "1.25", "-", "-", "-", "0.8"]
    assert "E_w = ||W - Q||^2" not in table


def test_table_of_no_rows():
    assert format_layer_table([]) == "(no quantized layers)"


def test_json_safe_converts_tensors_paths_and_non_finite_floats(tmp_path):
    value = {"t": torch.tensor([1.5, 2.0]), "s": torch.tensor(3), "p": tmp_path, "nan": math.nan,
             "inf": -math.inf, "tuple": (1, "a"), "dtype": torch.float16}
    assert json_safe(value) == {"t": [1.5, 2.0], "s": 3, "p": str(tmp_path), "nan": "nan",
                                "inf": "-inf", "tuple": [1, "a"], "dtype": "torch.float16"}


def test_write_report_json_round_trips_and_leaves_no_temporary(tmp_path):
    path = write_report_json([PT2_ROW, RTN_ROW], tmp_path / "sub" / "report.json",
                             extra={"source": "smollm2", "summary": {"bits": math.inf}})
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["summary"] == {"bits": "inf"}
    rows, meta = read_report(path)
    assert rows == [PT2_ROW, RTN_ROW] and meta["source"] == "smollm2"


def test_write_report_json_refuses_reserved_keys(tmp_path):
    with pytest.raises(ValueError, match="reserved keys"):
        write_report_json([], tmp_path / "r.json", extra={"layers": []})


def test_read_report_of_a_checkpoint_folder_uses_the_manifest_report(tmp_path):
    (tmp_path / "pt2pass.json").write_text(json.dumps(
        {"layers": {"x.weight": {"method": "pt2"}}, "report": [PT2_ROW]}))
    rows, meta = read_report(tmp_path)
    assert rows == [PT2_ROW] and "layers" in meta
    write_report_json([RTN_ROW], tmp_path / "report.json")
    assert read_report(tmp_path)[0] == [RTN_ROW]  # report.json wins: it has the timings


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"), (json.dumps({"layers": [{"x": 1}]}), "no per-layer report"),
    (json.dumps(3), "no per-layer report")])
def test_read_report_errors(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_report(path)


def test_read_report_of_a_folder_without_a_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="without report.json or pt2pass.json"):
        read_report(tmp_path)


def test_itf_history_of_the_layer_sums_the_blocks():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 256, generator=gen)
    X = torch.randn(512, 256, generator=gen)
    config = TernaryConfig(order="natural", compensation="none", aga=False)
    r = ternarize_weight(W, X.T @ X, config)
    # without compensation the blocks are the original columns: ITF of each block on its own
    per_block = [itf(W[:, :128].double()).history, itf(W[:, 128:].double()).history]
    n = max(map(len, per_block))
    want = [sum(h[min(i, len(h) - 1)] for h in per_block) for i in range(n)]
    assert r.stats["E_w_itf_history"] == pytest.approx(want, rel=1e-12)
    assert len(want) == r.stats["itf_iters_max"] + 1
    assert r.stats["E_w_itf_history"][-1] == pytest.approx(r.stats["E_w_itf"], rel=1e-5)
    assert r.stats["E_w_itf_history"][0] > 1.02 * r.stats["E_w_itf_history"][-1]


@pytest.mark.parametrize("row, problem", [
    ({"layer": 0}, "'layer' must be a string"),
    ({"layer": "a.weight", "shape": 5}, r"'shape' must be \[out_features, in_features\]"),
    ({"layer": "a.weight", "shape": [4, 0]}, "'shape' must be"),
    ({"layer": "a.weight", "E_w_itf_history": [1.0, None]}, "'E_w_itf_history' must be a number"),
])
def test_rows_from_another_tool_are_refused_by_row_and_key(tmp_path, row, problem):
    # they used to print a table and crash later (TypeError, IndexError, ZeroDivisionError)
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"layer": "ok.weight"}, row]))
    with pytest.raises(ValueError, match=rf"row 1 is not a pt2pass report row: {problem}"):
        read_report(path)
