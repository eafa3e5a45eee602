"""pt2pass.eval.perplexity against models whose answer is known, plus one real SmolLM2 check."""
import importlib
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ByteTokenizer

from pt2pass.eval import PerplexityResult, eval_text_ids, perplexity, tokenize_text

# `pt2pass.eval.perplexity` as an attribute is the re-exported function, so fetch the module itself.
ppl_mod = importlib.import_module("pt2pass.eval.perplexity")

V = 11


def uniform_model(ids):
    return torch.zeros(*ids.shape, V)


def successor_model(ids):
    """Puts (almost) all mass on (x + 1) % V, the true next token of the `counting` text."""
    return F.one_hot((ids + 1) % V, V).float() * 50.0


def counting(n):
    return torch.arange(n) % V


class TableModel(torch.nn.Module):
    """Bigram model: logits = table[current token]; an nn.Module returning an object with .logits."""

    def __init__(self, vocab=V, seed=0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, ids):
        return SimpleNamespace(logits=self.table[ids])


def reference_nll(model, ids, seqlen, n_windows):
    """Straightforward per-window cross entropy: the protocol written out."""
    total = 0.0
    for w in range(n_windows):
        x = ids[w * seqlen: (w + 1) * seqlen]
        total += F.cross_entropy(model.table[x[:-1]].double(), x[1:], reduction="sum").item()
    return total / (n_windows * (seqlen - 1))


def test_uniform_logits_give_ppl_equal_to_vocab_and_exact_counts():
    r = perplexity(uniform_model, counting(1000), seqlen=64, progress=False)
    assert isinstance(r, PerplexityResult)
    assert math.isclose(r.ppl, V, rel_tol=1e-6) and math.isclose(r.nll_mean, math.log(V), rel_tol=1e-6)
    assert (r.n_windows, r.n_tokens_scored, r.seqlen) == (15, 15 * 63, 64)  # tail of 40 dropped
    assert r.seconds >= 0


def test_perfect_model_gives_ppl_one():
    r = perplexity(successor_model, counting(512), seqlen=32, progress=False)
    assert r.ppl == pytest.approx(1.0, abs=1e-6) and r.n_windows == 16


def test_matches_reference_for_any_batch_size_chunking_and_max_windows(monkeypatch):
    model, ids = TableModel(), torch.randint(0, V, (1000,), generator=torch.Generator().manual_seed(1))
    want = reference_nll(model, ids, 50, 20)
    monkeypatch.setattr(ppl_mod, "_CHUNK_ELEMENTS", 7 * V)  # 7-row chunks, 49 targets: ragged end
    for bs in (1, 3, 20, 64):
        r = perplexity(model, ids, seqlen=50, batch_size=bs, progress=False)
        assert r.n_windows == 20 and r.nll_mean == pytest.approx(want, rel=1e-6)
    r = perplexity(model, ids.view(1, -1), seqlen=50, max_windows=3, progress=True)
    assert (r.n_windows, r.n_tokens_scored) == (3, 3 * 49)
    assert r.nll_mean == pytest.approx(reference_nll(model, ids, 50, 3), rel=1e-6)
    assert perplexity(model, ids, seqlen=50, max_windows=999, progress=False).n_windows == 20


def test_tuple_output_is_accepted():
    r = perplexity(lambda ids: (uniform_model(ids), None), counting(64), seqlen=16, progress=False)
    assert math.isclose(r.ppl, V, rel_tol=1e-6)


def test_hf_model_agrees_with_its_own_loss(tiny_llama):
    ids = torch.randint(0, 256, (3 * 32 + 5,), generator=torch.Generator().manual_seed(0))
    r = perplexity(tiny_llama, ids, seqlen=32, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [tiny_llama(w[None], labels=w[None]).loss.item() for w in ids[:96].view(3, 32)]
    assert r.n_windows == 3 and r.nll_mean == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_describe_and_logging(caplog):
    with caplog.at_level(logging.INFO, logger="pt2pass.eval.perplexity"):
        r = perplexity(uniform_model, counting(8 * 512 + 3), seqlen=512, progress=False)
    assert r.describe() == "ppl 11.00 over 8 windows × 512 tokens (4,088 predicted tokens)"
    assert r.describe() in caplog.text
    big = PerplexityResult(ppl=40.214, nll_mean=3.69, n_windows=16, n_tokens_scored=8176, seqlen=512,
                           seconds=1.0)
    assert big.describe() == "ppl 40.21 over 16 windows × 512 tokens (8,176 predicted tokens)"


@pytest.mark.parametrize("kwargs, ids, match", [
    (dict(seqlen=64), counting(63), "only 63 tokens, fewer than one window of seqlen=64"),
    (dict(seqlen=8), torch.zeros(16), r"token ids must be integers, got torch\.float32"),
    (dict(seqlen=8), torch.zeros(2, 16, dtype=torch.long), r"must be 1-D .* shape \(2, 16\)"),
    (dict(seqlen=8), torch.zeros(0, dtype=torch.long), "empty"),
    (dict(seqlen=1), counting(16), "seqlen=1 predicts no token"),
    (dict(seqlen=8, batch_size=0), counting(16), "batch_size=0 must be a positive integer"),
    (dict(seqlen=8, max_windows=0), counting(16), "max_windows=0 must be a positive integer"),
])
def test_bad_arguments(kwargs, ids, match):
    with pytest.raises(ValueError, match=match):
        perplexity(uniform_model, ids, progress=False, **kwargs)


def test_a_window_beyond_the_models_positions_is_warned(tiny_llama, caplog):
    ids = counting(2 * 300) % 256
    assert tiny_llama.config.max_position_embeddings == 256
    with caplog.at_level(logging.WARNING, logger="pt2pass.eval.perplexity"):
        perplexity(tiny_llama, ids, seqlen=128, progress=False)
        assert "beyond" not in caplog.text
        perplexity(tiny_llama, ids, seqlen=300, progress=False)
    assert "seqlen=300, beyond the model's max_position_embeddings (256)" in caplog.text


def test_wrong_logits_shape():
    with pytest.raises(ValueError, match=r"logits of shape .*\(1, 8, V\), got \(1, 8\)"):
        perplexity(lambda ids: ids.float(), counting(16), seqlen=8, progress=False)


def test_eval_text_ids_reads_and_tokenizes_once(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cd")
    ids = eval_text_ids(tok, [tmp_path / "a.txt", tmp_path / "b.txt"])
    assert ids.tolist() == list(b"ab\n\ncd")
    assert tok.calls == [dict(add_special_tokens=False, return_attention_mask=False, verbose=False)]
    assert tokenize_text(ByteTokenizer(), "xyz").tolist() == list(b"xyz")


@pytest.mark.slow
def test_smollm2_on_a_shakespeare_eval_play(smollm2, caplog):
    from pt2pass.data import DEFAULT_EVAL_PLAYS
    from pt2pass.models import shakespeare_files

    model, tok = smollm2
    old = tok.model_max_length
    tok.model_max_length = 128  # a whole play is far longer: must neither warn nor truncate
    hf_log = logging.getLogger("transformers")  # does not propagate to the root logger
    hf_log.addHandler(caplog.handler)
    try:
        ids = eval_text_ids(tok, shakespeare_files(DEFAULT_EVAL_PLAYS[:1]))
    finally:
        tok.model_max_length = old
        hf_log.removeHandler(caplog.handler)
    assert ids.numel() > 10_000 and "longer than" not in caplog.text
    r = perplexity(model, ids, seqlen=128, max_windows=2, progress=False)
    assert (r.n_windows, r.n_tokens_scored) == (2, 254)
    assert math.isfinite(r.ppl) and 5 < r.ppl < 500, r.describe()
