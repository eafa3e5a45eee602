"""MoE experts held as 3-D tensors (transformers 5's Mixtral / Qwen3-MoE): capture tags their
grouped matmuls, pt2pass.compile ternarizes every expert from the rows routed to it, lowering
gives one pt2pass.ternary_experts node per projection, and generate / save / load / export keep
the results exactly."""
import copy
import functools
import logging

import pytest
import torch

import pt2pass
from pt2pass import CompileConfig, TernaryConfig
from pt2pass.api import calibration_batches
from pt2pass.assemble import lowering_passes
from pt2pass.capture import capture
from pt2pass.experts import experts_nodes
from pt2pass.lowering.lower import TERNARY_EXPERTS_OP
from pt2pass.passes import SequentialTernarize
from pt2pass.passes.layer_quantizer import quantize_linear
from pt2pass.sizes import bits_per_weight, ternary_linear_sizes

from conftest import MOE, make_tiny_moe

EXPERTS, LAYERS = 4, 2


def tiny_moe(arch: str, layers: int = LAYERS):
    return make_tiny_moe(arch, layers)


def expert_weights(model):
    return {name: p for name, p in model.named_parameters() if p.dim() == 3}


RTN = TernaryConfig(method="rtn", aga=False, compensation="none", order="natural")
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
CONFIG = CompileConfig(seqlen=32, batch_size=2, ternary=TernaryConfig(block_size=64))


@pytest.fixture(scope="module", params=list(MOE))
def compiled(request):
    model = tiny_moe(request.param)
    return model, pt2pass.compile(model, CALIB, config=CONFIG, progress=False)


def test_capture_tags_each_projection_of_the_experts():
    model = tiny_moe("qwen3_moe")
    tagged = experts_nodes(capture(model))
    assert set(tagged) == set(expert_weights(model)) and len(tagged) == 2 * LAYERS


def test_every_expert_is_ternarized_and_lowered(compiled):
    model, qm = compiled
    weights = expert_weights(model)
    nodes = [n for n in qm.gm.graph.nodes if n.target is TERNARY_EXPERTS_OP]
    assert qm.experts_node_count() == len(nodes) == len(weights) == 2 * LAYERS
    assert qm.ternary_node_count() == 4 * LAYERS  # q, k, v, o; the router stays in full precision
    for fqn, w in weights.items():
        layer = qm.store[fqn]
        assert layer.is_experts and layer.shape == tuple(w.shape)
        assert layer.T.shape == w.shape and set(layer.T.unique().tolist()) <= {-1, 0, 1}
        assert layer.alpha.shape == (*w.shape[:2], w.shape[2] // 64)  # 64-column blocks
        assert layer.stats["experts"] == EXPERTS
    assert not any(p.dim() == 3 for p in qm.gm.parameters())  # no full-precision expert left


def test_no_warning_that_experts_stay_in_full_precision(caplog):
    with caplog.at_level(logging.WARNING):
        pt2pass.compile(tiny_moe("mixtral", layers=1), CALIB, config=CONFIG, progress=False)
    assert "stay in full precision" not in caplog.text


def test_the_lowered_model_computes_the_model_with_the_stores_dense_weights(compiled):
    """The HF model with each quantized weight replaced by the store's dequantized alpha T + mu
    (per expert, original column order) gives the lowered graph's logits: routing, sorting, the
    experts op and its permutations reproduce exactly what was quantized."""
    model, qm = compiled
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for fqn, layer in qm.store.layers.items():
            params[fqn].copy_(layer.dequantized())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(qm(ids).logits, reference(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)
        assert not torch.allclose(qm(ids).logits, model(input_ids=ids, use_cache=False).logits, atol=1e-4)
    assert torch.equal(qm.generate(ids[:1], 6), qm.generate_no_cache(ids[:1], 6))


def test_each_expert_is_quantized_from_its_own_hessian():
    """The quantizer sees one (out, in) matrix per expert, named fqn[e], each with a different H."""
    seen = {}

    def spy(fqn, W, H, config):
        seen[fqn] = (tuple(W.shape), H)
        return quantize_linear(fqn, W, H, config)

    model = tiny_moe("qwen3_moe", layers=1)
    batches = calibration_batches(model, CALIB, None, CONFIG)
    qm = pt2pass.compile(model, CALIB, config=CONFIG, progress=False,
                         passes=[SequentialTernarize(batches, CONFIG, quantize_fn=spy, progress=False),
                                 *lowering_passes()])
    fqn = "model.layers.0.mlp.experts.gate_up_proj"
    shapes = [seen[f"{fqn}[{e}]"][0] for e in range(EXPERTS)]
    assert shapes == [tuple(expert_weights(model)[fqn].shape[1:])] * EXPERTS
    hessians = [seen[f"{fqn}[{e}]"][1] for e in range(EXPERTS)]
    assert all(not torch.equal(hessians[0], h) for h in hessians[1:])
    assert qm.experts_node_count() == 2


def test_save_load_and_export_reproduce_the_model(compiled, tmp_path):
    _, qm = compiled
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = qm(ids).logits
    pt2pass.save(qm, tmp_path / "ckpt")
    assert torch.equal(pt2pass.load(tmp_path / "ckpt")(ids).logits, ref)
    torch.export.save(pt2pass.export(qm), tmp_path / "m.pt2")
    program = torch.export.load(tmp_path / "m.pt2")
    assert sum(n.target is TERNARY_EXPERTS_OP for n in program.graph.nodes) == 2 * LAYERS
    assert torch.equal(program.module()(ids).logits, ref)


def test_torch_compile_runs_the_experts_op_without_graph_break(compiled):
    _, qm = compiled
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    fn = torch.compile(qm, fullgraph=True)
    torch.testing.assert_close(fn(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)


def test_sizes_count_every_expert(compiled):
    model, qm = compiled
    sizes = ternary_linear_sizes(qm.gm)
    params = dict(model.named_parameters())
    assert set(expert_weights(model)) <= set(qm.store)
    assert sizes.n_weights == sum(params[fqn].numel() for fqn in qm.store)
    assert sizes.n_layers == 6 * LAYERS  # q, k, v, o, gate_up and down experts
    # per weight 2 code bits; per row and 64-column block two fp16 scales; int32 orders, one per expert
    bits = weights = 0
    for fqn, layer in qm.store.layers.items():
        shape = params[fqn].shape
        rows, k = shape[:-1].numel(), shape[-1]
        orders = 0 if layer.perm is None else (shape[0] if layer.is_experts else 1)
        bits += 2 * rows * k + 32 * rows * -(-k // 64) + 32 * k * orders
        weights += rows * k
    assert bits_per_weight(qm.store) == pytest.approx(bits / weights, rel=1e-12)


@pytest.mark.parametrize("route", ["stage", "two-pass"])
def test_stage_sequential_and_two_pass_calibration_ternarize_experts(route):
    """sequential="stage" (block inputs in full precision) and CaptureCalibration +
    TernarizeWeights (all Hessians first) also quantize every expert from its routed rows."""
    from pt2pass.passes import CaptureCalibration, TernarizeWeights

    model = tiny_moe("mixtral", layers=1)
    if route == "stage":
        config = CompileConfig(seqlen=32, batch_size=2, sequential="stage", ternary=TernaryConfig(block_size=64))
        qm = pt2pass.compile(model, CALIB, config=config, progress=False)
    else:
        batches = calibration_batches(model, CALIB, None, CONFIG)
        qm = pt2pass.compile(model, CALIB, config=CONFIG, progress=False,
                             passes=[CaptureCalibration(batches, progress=False),
                                     TernarizeWeights(CONFIG, progress=False), *lowering_passes()])
    assert qm.experts_node_count() == 2 and all(qm.store[f].is_experts for f in expert_weights(model))
    assert "model.layers.0.mlp.gate.weight" not in qm.store  # keep_routers holds in any pass list


@pytest.mark.parametrize("arch", list(MOE))
def test_routers_are_found_in_the_graph_and_kept_unless_asked(arch):
    """The router is the Linear whose logits reach the experts' offsets directly; keep_routers=False
    ternarizes it like any Linear."""
    from pt2pass.passes.expert_sites import router_linears

    model = tiny_moe(arch, layers=1)
    assert router_linears(capture(model)) == ["model.layers.0.mlp.gate.weight"]
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    assert "model.layers.0.mlp.gate.weight" not in qm.store and qm.ternary_node_count() == 4
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN, keep_routers=False), progress=False)
    assert "model.layers.0.mlp.gate.weight" in qm.store and qm.ternary_node_count() == 5


def test_bf16_moe_through_torch_grouped_mm_generates_and_packages_with_aotinductor(tmp_path):
    """A bf16 model runs its experts through aten._grouped_mm (not transformers' fallback op): it is
    lowered alike, its decode graph traces (the stand-in expert weights keep unit strides, which
    that op requires) and the exported program goes through AOTInductor on CPU."""
    model = tiny_moe("qwen3_moe", layers=1).to(torch.bfloat16)
    assert any(n.target is torch.ops.aten._grouped_mm.default for n in capture(model).graph.nodes)
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    assert qm.experts_node_count() == 2
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    assert torch.equal(qm.generate(ids[:1], 5), qm.generate_no_cache(ids[:1], 5))
    ref = qm(ids).logits
    path = torch._inductor.aoti_compile_and_package(pt2pass.export(qm), package_path=str(tmp_path / "moe.pt2"))
    logits = torch._inductor.aoti_load_package(path)(ids).logits
    torch.testing.assert_close(logits.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_gptq_experts_run_dense_and_survive_generate_and_a_checkpoint(tmp_path):
    """The GPTQ baseline is not lowered: its experts run dense in every graph (the decode graph
    and a loaded checkpoint rebuild them from the stacked store)."""
    model = tiny_moe("qwen3_moe", layers=1)
    config = CompileConfig(seqlen=32, batch_size=2, ternary=TernaryConfig(method="gptq", block_size=64))
    qm = pt2pass.compile(model, CALIB, config=config, progress=False)
    assert qm.experts_node_count() == 0 and qm.store["model.layers.0.mlp.experts.down_proj"].is_experts
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(8))
    assert torch.equal(qm.generate(ids, 4), qm.generate_no_cache(ids, 4))
    pt2pass.save(qm, tmp_path / "ckpt")
    assert torch.equal(pt2pass.load(tmp_path / "ckpt")(ids).logits, qm(ids).logits)


def test_experts_weight_read_by_another_op_stays_in_full_precision():
    """Quantizing a weight that another op also reads would hand that op the quantized values."""
    from pt2pass.passes.expert_sites import classify_experts

    class ReadTwice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)
            self.w = torch.nn.Parameter(torch.randn(2, 32, 16))

        def forward(self, x, offs):
            y = torch.ops.transformers.grouped_mm_fallback(self.proj(x), self.w.transpose(-2, -1), offs)
            return y + self.w.sum()

    gm = capture(ReadTwice(), (torch.randn(5, 16), torch.tensor([2, 5], dtype=torch.int32)))
    sites, excluded = classify_experts(gm)
    assert not sites and "is also read by" in excluded["w"]


MORE_MOE = ["Qwen2Moe", "Olmoe", "Phimoe", "Glm4Moe", "Ernie4_5_Moe", "HunYuanMoEV1"]
MOE_SETTINGS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
                    moe_k=2, first_k_dense_replace=0, moe_layer_start_index=0, n_group=1, topk_group=1, head_dim=16,
                    shared_expert_intermediate_size=64, n_shared_experts=1, tie_word_embeddings=False)


@pytest.mark.parametrize("family", MORE_MOE)
def test_more_moe_families_ternarize_their_experts_and_generate_like_the_no_cache_loop(family):
    """Each family's settings are the ones of MOE_SETTINGS its config takes (2 layers of 4 experts)."""
    import inspect

    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    accepted = inspect.signature(config_cls.__init__).parameters
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(
        config_cls(**{k: v for k, v in MOE_SETTINGS.items() if k in accepted})).eval()
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    assert qm.experts_node_count() == 2 * LAYERS
    assert not any(p.dim() == 3 for p in qm.gm.parameters())
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(qm.generate(ids, 4), qm.generate_no_cache(ids, 4))


def test_transposed_experts_stay_in_full_precision_with_a_warning(caplog):
    """GPT-OSS stores its experts (E, in, out) and adds a bias: not rewritten, and said so."""
    import transformers

    config = transformers.GptOssConfig(**{k: v for k, v in MOE_SETTINGS.items()
                                          if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "num_local_experts",
                                                   "num_experts_per_tok", "head_dim", "tie_word_embeddings")})
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        qm = pt2pass.compile(transformers.GptOssForCausalLM(config).eval(), None,
                             config=CompileConfig(ternary=RTN), progress=False)
    assert qm.experts_node_count() == 0 and "has a form pt2pass does not rewrite" in caplog.text
    assert "stay in full precision" in caplog.text


def test_granite_moe_whose_forward_takes_use_cache_through_kwargs_is_captured():
    """torch.export cannot take dynamic shapes for inputs of a **kwargs parameter: capture names
    them for the trace, and gives the model its own forward back."""
    import transformers

    config = transformers.GraniteMoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GraniteMoeForCausalLM(config).eval()
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    assert qm.experts_node_count() == 2 * LAYERS and "forward" not in model.__dict__
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(qm.generate(ids, 4), qm.generate_no_cache(ids, 4))
    # a forward the model already held as an instance attribute (e.g. accelerate's hook) runs
    # during the trace and is given back
    calls = []
    hooked = functools.update_wrapper(
        lambda *a, **k: calls.append(1) or type(model).forward(model, *a, **k), type(model).forward)
    model.forward = hooked
    pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    assert model.__dict__["forward"] is hooked and calls


MLA = {"DeepseekV3": {}, "DeepseekV2": {}, "Glm4MoeLite": {}}
MLA_SETTINGS = dict(MOE_SETTINGS, num_key_value_heads=4, n_routed_experts=8, n_group=2, first_k_dense_replace=1,
                    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)


@pytest.mark.parametrize("family", list(MLA))
def test_latent_attention_moe_decodes_with_its_own_cache_shapes(family):
    """DeepSeek-style multi-head latent attention caches a 1-head latent (kv_lora_rank) as keys and
    the rotary part (qk_rope_head_dim) as values: the static cache takes the shapes a probe on fake
    tensors finds, and generate equals the no-cache loop."""
    import inspect

    import transformers

    from pt2pass.cache_shapes import probe_cache_shapes

    config_cls = getattr(transformers, f"{family}Config")
    accepted = inspect.signature(config_cls.__init__).parameters
    settings = {k: v for k, v in MLA_SETTINGS.items() if k in accepted}
    if family == "Glm4MoeLite":
        settings["n_group"] = 1
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config_cls(**settings)).eval()
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    assert probe_cache_shapes(qm.skeleton) == [(1, 32, 16)] * 2 and qm.experts_node_count() == 2
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(qm.generate(ids, 4), qm.generate_no_cache(ids, 4))
