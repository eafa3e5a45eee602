"""Bad inputs to pt2pass.compile: each fails with an error naming the problem, before the user's
model is touched, or (where the input is legal but awkward) works with a logged explanation.

Covered elsewhere, not repeated here: empty / float / too-short / out-of-vocabulary calibration
ids and a model without Linear layers (tests/test_api.py); every malformed calibration source,
negative ids, n_samples beyond the data (tests/test_data.py); NaN activations reaching the
Hessian accumulator (tests/quant/test_hessian.py).
"""
import logging

import pytest
import torch
from torch import nn

import pt2pass
from pt2pass import CompileConfig, PassError, TernaryConfig
from pt2pass.capture import CaptureError

FAST = CompileConfig(skip=(), ternary=TernaryConfig(block_size=16))


def mlp(d_in=32, d_hidden=64, d_out=32, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden, bias=bias), nn.ReLU(),
                         nn.Linear(d_hidden, d_out, bias=bias)).eval()


def compile_mlp(model, calib=None, config=FAST, **kwargs):
    """compile a generic module whose input width is that of its first Linear (else 32)."""
    d_in = next((m.in_features for m in model.modules() if isinstance(m, nn.Linear)), 32)
    calib = torch.randn(64, d_in, generator=torch.Generator().manual_seed(1)) if calib is None else calib
    return pt2pass.compile(model, calib, config=config, progress=False,
                           example_inputs=(torch.randn(2, d_in),), **kwargs)


# ---- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: TernaryConfig(method="awq"), r"method='awq' is not supported; allowed: 'pt2', 'rtn'"),
    (lambda: TernaryConfig(order="random"), r"order='random' is not supported"),
    (lambda: TernaryConfig(block_size=100), r"block_size=100 must be a multiple of 16"),
    (lambda: TernaryConfig(damp="0.01"), r"damp='0.01' must be a real number"),
    (lambda: TernaryConfig(damp=1.5), r"damp=1.5 must be in \[0, 1\)"),
    (lambda: CompileConfig(sequential="block"), r"sequential='block' is not supported"),
    (lambda: CompileConfig(batch_size=0), r"batch_size=0 must be a positive integer"),
    (lambda: CompileConfig(batch_size=2.5), r"batch_size=2.5 must be a positive integer"),
    (lambda: CompileConfig(batch_size=True), r"batch_size=True must be a positive integer"),
    (lambda: CompileConfig(n_samples=0), r"n_samples=0 must be a positive integer"),
    (lambda: CompileConfig(n_samples=-4), r"n_samples=-4 must be a positive integer"),
    (lambda: CompileConfig(seqlen=0), r"seqlen=0 must be a positive integer"),
    (lambda: CompileConfig(seed=1.5), r"seed=1.5 must be an integer"),
    (lambda: CompileConfig(offload_activations="yes"), r"offload_activations='yes' must be True or False"),
    (lambda: CompileConfig(ternary="pt2"), r"ternary='pt2' must be a TernaryConfig"),
    (lambda: CompileConfig(skip=("lm_head", "")), r"every entry must be a non-empty string"),
    (lambda: CompileConfig(text_column=""), r"text_column='' must be a non-empty string"),
    (lambda: TernaryConfig(aga="false"), r"aga='false' must be True or False"),
    (lambda: TernaryConfig(method="gptq", bits=16), r"bits=16 must be in 1..8"),
])
def test_invalid_config_values_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_config_option_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'offload'"):
        CompileConfig(offload=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocksize'"):
        TernaryConfig(blocksize=64)


def test_skip_given_as_a_bare_string_is_refused():
    """Regression: skip="lm_head" was iterated character by character; every FQN contains "e"
    (from "weight"), so every Linear was skipped and compile failed far from the cause."""
    with pytest.raises(ValueError, match=r"skip='lm_head' must be a tuple of FQN substrings"):
        CompileConfig(skip="lm_head")
    assert CompileConfig(skip=["lm_head", "k_proj"]).skip == ("lm_head", "k_proj")  # list: fine


@pytest.mark.parametrize("tokenizer, config, match", [
    # with token ids the tokenizer is never called: this ran the defaults (pt2, seqlen 512) unnoticed
    (CompileConfig(seqlen=32), None, r"third argument is the tokenizer, got a CompileConfig: .*config="),
    (TernaryConfig(method="rtn"), None, r"third argument is the tokenizer, got a TernaryConfig"),
    (None, TernaryConfig(method="rtn"), r"config must be a pt2pass.CompileConfig, got TernaryConfig "
                                        r"\(a TernaryConfig goes inside it: CompileConfig\(ternary=...\)\)"),
    (None, {"seqlen": 32}, r"config must be a pt2pass.CompileConfig, got dict"),
])
def test_a_config_in_the_wrong_place_is_refused(tiny_llama, tokenizer, config, match):
    ids = torch.randint(0, 256, (2, 64))
    with pytest.raises(TypeError, match=match):
        pt2pass.compile(tiny_llama, ids, tokenizer, config, progress=False)


# ---- calibration data -------------------------------------------------------------------------

def test_calibration_on_another_device_than_the_model_is_refused():
    """A generic module's calibration tensors must be on the model's device (simulated: meta)."""
    with pytest.raises(ValueError, match="calibration input 0 is on meta but the model is on cpu"):
        compile_mlp(mlp(), calib=torch.randn(64, 32, device="meta"))


def test_causal_lm_calibration_ids_are_moved_to_the_model_device(tiny_llama, monkeypatch):
    """For an HF causal LM the token ids are moved to the model's device (simulated: meta)."""
    from pt2pass import api

    monkeypatch.setattr(api, "_device_of", lambda model: torch.device("meta"))
    batches = api.calibration_batches(tiny_llama, torch.randint(0, 256, (4, 32)), None,
                                      CompileConfig(seqlen=32, batch_size=2))
    assert [b[1]["input_ids"].device.type for b in batches] == ["meta", "meta"]


def test_calibration_list_with_a_non_tensor():
    with pytest.raises(TypeError, match="calibration input 1 is a str, not a tensor"):
        compile_mlp(mlp(), calib=[torch.randn(4, 32), "text"])


def test_missing_example_inputs_for_a_generic_module():
    # without calibration data there is nothing to trace a generic module with
    rtn = CompileConfig(skip=(), ternary=TernaryConfig(method="rtn", block_size=16))
    with pytest.raises(ValueError, match="example_inputs are required for a model that is not"):
        pt2pass.compile(mlp(), None, config=rtn, progress=False)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_a_generic_module_is_traced_with_its_first_calibration_batch(batch_size):
    # example_inputs used to be required even when the calibration tensors show the input shape;
    # a first batch of one row must not fix the traced batch to 1
    model = mlp()
    config = CompileConfig(skip=(), batch_size=batch_size, ternary=TernaryConfig(block_size=16))
    qm = pt2pass.compile(model, torch.randn(16, 32), config=config, progress=False)
    assert qm.ternary_node_count() == 2
    for rows in (1, 3):
        x = torch.randn(rows, 32)
        with torch.no_grad():
            assert (qm(x) - model(x)).norm() / model(x).norm() < 0.5


def test_more_samples_than_the_data_holds(tiny_llama):
    with pytest.raises(ValueError, match=r"n_samples=9 windows of seqlen=32 requested.*only 4"):
        pt2pass.compile(tiny_llama, torch.randint(0, 256, (2, 64)),
                        config=CompileConfig(seqlen=32, n_samples=9), progress=False)


def test_text_column_reaches_the_data_layer(tiny_llama, tmp_path):
    import json

    from conftest import ByteTokenizer

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"content": "to be or not " * 5}) + "\n"
                                              for _ in range(4)))
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['content'\]\)"):
        pt2pass.compile(tiny_llama, tmp_path / "c.jsonl", ByteTokenizer(), CompileConfig(seqlen=32))
    # read through text_column: the n_samples check then counts its tokens (and stops before work)
    with pytest.raises(ValueError, match=r"n_samples=99 windows .* \(266 tokens\) gives only 8"):
        pt2pass.compile(tiny_llama, tmp_path / "c.jsonl", ByteTokenizer(),
                        CompileConfig(seqlen=32, n_samples=99, text_column="content"))


# ---- weights and activations -------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_named_before_any_work(value, monkeypatch):
    from pt2pass import api

    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = value
    monkeypatch.setattr(api, "capture", lambda *a, **k: pytest.fail("capture ran"))
    with pytest.raises(ValueError, match=r"^2\.weight contains 1 NaN/Inf value\(s\) \(the first at "
                                         r"\[3, 5\]\).*nothing was quantized"):
        compile_mlp(model)


def test_non_finite_weight_in_a_skipped_layer_is_not_an_error():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    qm = compile_mlp(model, config=CompileConfig(skip=("2.",), ternary=TernaryConfig(block_size=16)))
    assert qm.ternary_node_count() == 1


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)  # NaN for the negative pre-activations


def test_nan_activations_name_the_linear_that_reads_them():
    """Regression: the error said only "activations contain NaN/Inf", not where."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), Sqrt(), nn.Linear(64, 32)).eval()
    with pytest.raises(PassError, match=r"calibration input of 2\.weight \(graph node sqrt\): "
                                        r"activations contain \d+ NaN/Inf"):
        compile_mlp(model)


def test_nan_in_calibration_inputs_names_the_first_linear():
    calib = torch.randn(64, 32)
    calib[10, 3] = float("nan")
    with pytest.raises(PassError, match=r"calibration input of 0\.weight .*1 NaN/Inf"):
        compile_mlp(mlp(), calib=calib)


def test_zero_rows_and_dead_input_columns_work():
    model = mlp()
    with torch.no_grad():
        model[0].weight[[0, 7]] = 0.0   # two hidden units that are always 0
        model[2].weight[4] = 0.0        # an output that is always 0
    calib = torch.randn(64, 32)
    calib[:, [1, 9, 30]] = 0.0          # input columns that never fire
    qm = compile_mlp(model, calib=calib)
    x = torch.randn(16, 32)
    with torch.no_grad():
        y, ref = qm(x), model(x)
    assert torch.isfinite(y).all() and (y[:, 4] == 0).all()
    assert qm.store["0.weight"].stats["n_dead_columns"] == 3
    assert qm.store["2.weight"].stats["n_dead_columns"] == 2  # the hidden units 0 and 7
    assert ((y - ref).norm() / ref.norm()) < 0.5


def test_linears_with_bias_keep_their_bias():
    model = mlp(bias=True)
    with torch.no_grad():
        model[2].bias.fill_(3.0)  # far from 0: a dropped bias would be obvious
    qm = compile_mlp(model)
    x = torch.randn(16, 32)
    with torch.no_grad():
        y, ref = qm(x), model(x)
    assert ((y - ref).norm() / ref.norm()) < 0.1


# ---- layer shapes ----------------------------------------------------------------------------

def test_in_features_not_a_multiple_of_16_stays_full_precision(caplog):
    """Regression: a Linear with in_features=40 was quantized with the rest and then failed the
    lowering ("pack_ternary needs in_features divisible by 16"), throwing all the work away. Such
    a Linear is now kept in full precision, with a warning naming it, before any work."""
    model = mlp(d_in=40)
    with caplog.at_level(logging.WARNING, logger="pt2pass.passes.linear_sites"):
        qm = compile_mlp(model)
    assert "0.weight has in_features=40, not a multiple of 16" in caplog.text
    assert qm.ternary_node_count() == 1 and set(qm.store) == {"2.weight"}
    x = torch.randn(8, 40)
    with torch.no_grad():
        assert ((qm(x) - model(x)).norm() / model(x).norm()) < 0.5


def test_in_features_not_a_multiple_of_the_block_size_uses_a_partial_block():
    qm = compile_mlp(mlp(d_in=48), config=CompileConfig(skip=(), ternary=TernaryConfig(block_size=32)))
    assert qm.ternary_node_count() == 2 and qm.store["0.weight"].alpha.shape == (64, 2)


def test_only_linear_not_packable_is_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32)).eval()
    with pytest.raises(ValueError, match=r"Sequential: no Linear layer can be ternarized .*0\.weight "
                                         r"has in_features=40, not a multiple of 16"):
        compile_mlp(model)


def test_every_linear_skipped_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no Linear layer can be ternarized \(Linear weights in the "
                                         r"graph: 0\.weight skipped by CompileConfig\.skip \('weight'\)"):
        compile_mlp(mlp(), config=CompileConfig(skip=("weight",)))


def test_a_skip_entry_matching_nothing_is_named(caplog):
    with caplog.at_level("WARNING", logger="pt2pass.api"):
        qm = compile_mlp(mlp(), config=CompileConfig(skip=("lm_haed",), ternary=TernaryConfig(method="rtn")))
    assert "skip entry 'lm_haed' matches no Linear or experts weight" in caplog.text
    assert qm.ternary_node_count() > 0


class Conv1DLike(nn.Module):
    """Like transformers' Conv1D (GPT-2): a (in, out) weight used through addmm, not nn.Linear."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.02)

    def forward(self, x):
        return x @ self.weight


def test_matrix_weights_outside_nn_linear_are_named():
    model = nn.Sequential(Conv1DLike(32, 32), nn.ReLU(), Conv1DLike(32, 32))
    with pytest.raises(ValueError, match=r"Sequential has no nn.Linear layers.*2 module\(s\) hold a "
                                         r"2-D weight but are not nn.Linear, e.g. 0 \(Conv1DLike\), "
                                         r"2 \(Conv1DLike\)"):
        compile_mlp(model)


class ExpertsLike(nn.Module):
    """Like transformers' MoE experts: the experts' weights as one 3-D tensor, used through bmm."""

    def __init__(self, n_experts, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, d, d) * 0.02)

    def forward(self, x):
        return torch.einsum("bd,edf->bf", x, self.weight)


def test_weights_left_in_full_precision_outside_linears_are_warned(caplog):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), ExpertsLike(4, 32)).eval()
    with caplog.at_level("WARNING", logger="pt2pass.api"):
        qm = compile_mlp(model, config=CompileConfig(skip=(), ternary=TernaryConfig(method="rtn")))
    assert qm.ternary_node_count() == 1
    share = 100 * 4 * 32 * 32 / (4 * 32 * 32 + 32 * 32 + 32)
    assert (f"1 weight tensor(s) outside nn.Linear stay in full precision: {share:.1f}% of the parameters "
            "(e.g. 2.weight 4,096)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pt2pass.api"):
        compile_mlp(mlp(), config=CompileConfig(skip=(), ternary=TernaryConfig(method="rtn")))
    assert "outside nn.Linear" not in caplog.text


class OwnMatmulLinear(nn.Linear):
    """An nn.Linear whose forward skips F.linear (like Falcon's FalconLinear)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_a_linear_that_never_runs_as_aten_linear_is_warned(caplog):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), OwnMatmulLinear(32, 32)).eval()
    with caplog.at_level("WARNING", logger="pt2pass.api"):
        qm = compile_mlp(model, config=CompileConfig(skip=(), ternary=TernaryConfig(method="rtn")))
    assert qm.ternary_node_count() == 1
    assert ("1 nn.Linear module(s) never run as aten.linear, e.g. 2 (OwnMatmulLinear): their forward does its "
            "own matmul, which pt2pass does not ternarize: they stay in full precision") in caplog.text


# ---- capture -----------------------------------------------------------------------------------

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: torch.export cannot capture it
            return self.proj(x)
        return -self.proj(x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 32)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.inp(x))


def test_capture_error_names_the_construct_the_module_and_the_way_out():
    model = Untraceable().eval()
    with pytest.raises(CaptureError) as info:
        pt2pass.compile(model, torch.randn(16, 32), config=FAST, progress=False,
                        example_inputs=(torch.randn(2, 32),))
    msg = str(info.value)
    assert msg.startswith("torch.export could not trace Untraceable: GuardOnDataDependentSymNode: ")
    assert "failing construct: `if x.sum() > 0:  # data-dependent" in msg
    assert "` at " + __file__ + ":" in msg
    assert "in the forward of submodule 'gate' (Gate)" in msg
    assert "rewrite it with torch.where or torch.cond" in msg
    assert "CompileConfig.skip only keeps Linears in full precision" in msg
    assert "pt2pass.compile(model.<submodule>, calib, example_inputs=...)" in msg


def test_the_suggested_workaround_works():
    """Compiling a traceable submodule on its own and putting it back, as the message says."""
    model = Untraceable().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = model(x)
    model.inp = compile_mlp(model.inp)
    with torch.no_grad():
        y = model(x)
    assert model.inp.ternary_node_count() == 1 and ((y - ref).norm() / ref.norm()) < 0.5


# ---- nothing half-done -------------------------------------------------------------------------

@pytest.mark.parametrize("break_it", ["nan_weight", "nan_activation", "untraceable", "bad_device"])
def test_a_failed_compile_leaves_the_model_untouched(break_it):
    model = nn.Sequential(nn.Linear(32, 64), Sqrt() if break_it == "nan_activation" else nn.ReLU(),
                          nn.Linear(64, 32))
    calib = torch.randn(64, 32)
    if break_it == "nan_weight":
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    if break_it == "untraceable":
        model = Untraceable()
    if break_it == "bad_device":
        calib = calib.to("meta")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, PassError, CaptureError)):
        pt2pass.compile(model, calib, config=FAST, progress=False, example_inputs=(torch.randn(2, 32),))
    assert model.training  # mode restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert all(p.requires_grad for p in model.parameters())
