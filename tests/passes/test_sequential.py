"""SequentialTernarize follows the GPTQ / PT²-LLM calibration protocol exactly."""
import pytest
import torch

from pt2pass import CompileConfig, PassManager, SequentialTernarize, capture, store_of
from pt2pass.capture import linear_nodes
from pt2pass.passes.linear_sites import get_weight, set_weight
from pt2pass.runner import BatchedGraphRunner, PerBatch, causal_lm_batches
from pt2pass.store import LayerQuant


class CoarseQuantizer:
    """A stand-in quantizer (sign * mean|W|) that records the Hessian each layer received."""

    def __init__(self):
        self.hessians = {}

    def __call__(self, fqn, W, H, config):
        self.hessians[fqn] = H
        Q = W.sign() * W.abs().mean()
        T = W.sign().to(torch.int8)
        n_blocks = W.shape[1] // config.block_size
        ones = torch.ones(W.shape[0], n_blocks)
        return LayerQuant(fqn, "pt2", T, ones * W.abs().mean(), ones * 0, None), Q


def _hessian_of_input(gm, fqn, batches):
    """Reference H = (2/N) Σ xxᵀ of the input of Linear ``fqn`` when running ``gm`` as it is."""
    node = linear_nodes(gm)[fqn]
    runner = BatchedGraphRunner(gm, batches, [node])
    with torch.no_grad():
        for _, nodes in runner.segments():
            for n in nodes:
                if n is node:
                    break
                runner.run_node(n)
    x = torch.cat([v.reshape(-1, v.shape[-1]) for v in runner.value(node.args[0]).values]).double()
    return (2.0 / x.shape[0]) * x.T @ x


def _run(model, mode, batch_size=2):
    ids = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (4, 16), generator=ids)
    batches = causal_lm_batches(ids, batch_size)
    gm = capture(model)
    quantizer = CoarseQuantizer()
    config = CompileConfig(sequential=mode, seqlen=16)
    gm = PassManager([SequentialTernarize(batches, config, quantize_fn=quantizer, progress=False)])(gm)
    return gm, quantizer, batches


O_PROJ = "model.layers.1.self_attn.o_proj.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def test_linear_mode_hessians_come_from_already_quantized_linears(tiny_llama):
    gm, quantizer, batches = _run(tiny_llama, "linear")
    assert len(store_of(gm)) == 14  # every Linear but lm_head
    # Running the final (fully quantized) graph reproduces every Linear's calibration input:
    # each Linear saw the outputs of all Linears before it already quantized.
    for fqn in [Q_PROJ, O_PROJ, "model.layers.1.mlp.down_proj.weight"]:
        torch.testing.assert_close(quantizer.hessians[fqn].double(), _hessian_of_input(gm, fqn, batches),
                                   rtol=1e-5, atol=1e-6)


def test_stage_mode_quantizes_a_block_from_full_precision_block_inputs(tiny_llama):
    gm, quantizer, batches = _run(tiny_llama, "stage")
    # Restore block 1's full-precision weights: its Linears were calibrated on FP block inputs.
    fp = dict(tiny_llama.named_parameters())
    for fqn in linear_nodes(gm):
        if fqn.startswith("model.layers.1."):
            set_weight(gm, fqn, fp[fqn].detach())
    ref = _hessian_of_input(gm, O_PROJ, batches)
    torch.testing.assert_close(quantizer.hessians[O_PROJ].double(), ref, rtol=1e-5, atol=1e-6)
    linear_gm, linear_q, _ = _run(tiny_llama, "linear")
    assert not torch.allclose(linear_q.hessians[O_PROJ], quantizer.hessians[O_PROJ], rtol=1e-3)


def test_shared_input_hessian_computed_once(tiny_llama):
    _, quantizer, _ = _run(tiny_llama, "linear")
    h = quantizer.hessians
    prefix = "model.layers.0."
    assert h[prefix + "self_attn.q_proj.weight"] is h[prefix + "self_attn.k_proj.weight"]
    assert h[prefix + "self_attn.k_proj.weight"] is h[prefix + "self_attn.v_proj.weight"]
    assert h[prefix + "mlp.gate_proj.weight"] is h[prefix + "mlp.up_proj.weight"]
    assert h[prefix + "mlp.down_proj.weight"] is not h[prefix + "mlp.up_proj.weight"]


def test_calibration_batch_size_does_not_change_hessians(tiny_llama):
    _, q1, _ = _run(tiny_llama, "linear", batch_size=1)
    _, q4, _ = _run(tiny_llama, "linear", batch_size=4)
    for fqn in q1.hessians:
        torch.testing.assert_close(q1.hessians[fqn], q4.hessians[fqn], rtol=1e-5, atol=1e-6)


def test_graph_weights_replaced_but_user_model_untouched(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    gm, _, _ = _run(tiny_llama, "linear")
    w = get_weight(gm, Q_PROJ)
    assert torch.equal(w, w.sign() * w.abs().max())  # replaced by the coarse Q
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_no_quantizable_linear_is_an_error(tiny_llama):
    gm = capture(tiny_llama)
    config = CompileConfig(skip=("proj", "lm_head"))
    batches = causal_lm_batches(torch.randint(0, 256, (2, 8)), 2)
    with pytest.raises(Exception, match="no quantizable Linear nodes"):
        PassManager([SequentialTernarize(batches, config, progress=False)])(gm)
