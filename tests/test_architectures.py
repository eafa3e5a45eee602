"""pt2pass.compile on tiny random LLaMA, Qwen2 (q/k/v bias), Qwen3 (q/k norms) and Mistral, with
tied and untied embeddings; sliding-window models (Mistral, Gemma 3) generating past the window;
fourteen more decoder families (MORE_ARCHITECTURES); clear refusals of GPT-2 (Conv1D, no
nn.Linear) and Falcon's FalconLinear; OPT's decode through the padded step.

The four main model classes exist in transformers 5.17 (the GPU machine) and 5.23.
"""
import logging

import pytest
import torch
import transformers
from torch import nn

import pt2pass
from pt2pass import CompileConfig, TernaryConfig
from pt2pass.capture import LINEAR_OP, WEIGHT_FQN
from pt2pass.decode import generate_with_program
from pt2pass.lowering.lower import TERNARY_OP

ARCHITECTURES = {  # name: (config class, model class, extra settings)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
}
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
RTN = TernaryConfig(method="rtn", aga=False, compensation="none", order="natural")


def tiny(arch: str, tied: bool, layers: int = 2, **overrides):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, **{**extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def linear_weight_fqns(model):
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _logits(qm, model):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return qm(ids).logits, model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_rtn_with_nothing_skipped(arch, tied, caplog):
    """Every Linear is tagged at capture; with skip=() an untied lm_head is ternarized too, a tied
    one stays in full precision (ternarizing it would change the embedding) and the log says why."""
    model = tiny(arch, tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with caplog.at_level(logging.WARNING, logger="pt2pass.passes.linear_sites"):
        qm = pt2pass.compile(model, None, config=CompileConfig(skip=(), ternary=RTN), progress=False)
    tagged = {n.meta[WEIGHT_FQN] for n in qm.gm.graph.nodes
              if n.target in (TERNARY_OP, LINEAR_OP) and WEIGHT_FQN in n.meta}
    head = {"lm_head.weight", "model.embed_tokens.weight"}  # a tied head may carry either name
    assert tagged - head == linear_weight_fqns(model) - head and len(tagged & head) == 1
    assert qm.ternary_node_count() == 2 * LINEARS_PER_BLOCK + (0 if tied else 1)
    assert ("is tied (also used by embedding): kept in full precision" in caplog.text) == tied
    logits, _ = _logits(qm, model)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_pt2_default_config_ternarizes_all_but_the_head(arch):
    model = tiny(arch, tied=False, layers=1)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = CompileConfig(seqlen=32, batch_size=2, ternary=TernaryConfig(block_size=64))
    qm = pt2pass.compile(model, calib, config=config, progress=False)
    assert qm.ternary_node_count() == LINEARS_PER_BLOCK
    assert "lm_head.weight" not in qm.store and len(qm.store) == LINEARS_PER_BLOCK
    logits, ref = _logits(qm, model)
    assert torch.isfinite(logits).all()
    assert (logits.softmax(-1) - ref.softmax(-1)).abs().sum(-1).mean() < 0.5
    biased = {n.meta[WEIGHT_FQN].split(".")[-2] for n in qm.gm.graph.nodes
              if n.target is TERNARY_OP and n.args[4] is not None}
    assert biased == ({"q_proj", "k_proj", "v_proj"} if arch == "qwen2" else set())


def test_qwen3_keeps_its_q_and_k_norms():
    qm = pt2pass.compile(tiny("qwen3", tied=False, layers=1), None,
                         config=CompileConfig(ternary=RTN), progress=False)
    params = dict(qm.gm.named_parameters())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= set(params)


def test_gpt2_conv1d_is_refused_naming_what_is_missing():
    """GPT-2's blocks use transformers' Conv1D, not nn.Linear; its only Linear is the tied head."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: no Linear layer can be ternarized "
                                         r"\(Linear weights in the graph: lm_head\.weight skipped by "
                                         r"CompileConfig\.skip \('lm_head'\)\)\. 8 module\(s\) hold a "
                                         r"2-D weight but are not nn\.Linear, e\.g\. "
                                         r"transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_generate_with_the_decode_attention_op_equals_the_no_cache_loop(arch):
    """Decode graphs take pt2pass.attention by default (LowerDecodeAttention): one node per layer,
    none of HF's SDPA left, and greedy tokens equal to re-running the full sequence each step."""
    from pt2pass.decode import build_decode_graph
    from pt2pass.lowering.lower_attention import ATTENTION_OP, SDPA

    # Mistral's config has a sliding window by default, which static decode graphs refuse (next
    # test); Mistral-7B-v0.2 and later have none
    model = tiny(arch, tied=False, **({"sliding_window": None} if arch == "mistral" else {}))
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    step = build_decode_graph(qm.skeleton, qm.store, 1, 32)
    targets = [n.target for n in step.graph.nodes]
    assert (targets.count(ATTENTION_OP), targets.count(SDPA)) == (2, 0)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(9))
    assert torch.equal(qm.generate(ids, 6), qm.generate_no_cache(ids, 6))


def _sliding(arch: str, window):
    """A tiny model of ``arch`` whose sliding-window layers see ``window`` tokens (None: no window)."""
    if arch == "mistral":
        return tiny("mistral", tied=False, sliding_window=window)
    torch.manual_seed(0)  # Gemma 3: five sliding layers, then a full one
    config = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=window or 128,
        pad_token_id=0)
    return transformers.Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_models_generate_with_the_cache_past_the_window(arch):
    """Sliding-window layers get a full-length static cache layer and take the window from HF's
    mask: greedy tokens over 4.5 windows equal the no-cache loop's, and the window does change
    them (the same weights without a window give others)."""
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    tokens = {}
    for window in (8, None):
        qm = pt2pass.compile(_sliding(arch, window), None, config=CompileConfig(ternary=RTN), progress=False)
        tokens[window] = qm.generate(ids, 30)
        assert torch.equal(tokens[window], qm.generate_no_cache(ids, 30))
    assert not torch.equal(tokens[8], tokens[None])


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_sliding_window_model_scores_a_padded_batch_as_each_row_alone(side):
    """Rows longer than the 4-token window, padded: each row's logits at its tokens are the ones it
    gets alone (the window counts slots; a row's tokens sit in consecutive slots)."""
    qm = pt2pass.compile(_sliding("mistral", 4), None, config=CompileConfig(ternary=RTN), progress=False)
    rows = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 14)]
    ids = torch.zeros(2, 16, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(rows):
        slots = range(16 - len(p), 16) if side == "left" else range(len(p))
        ids[r, list(slots)], mask[r, list(slots)] = p, 1
    got = qm(ids, attention_mask=mask).logits
    for r, p in enumerate(rows):
        assert torch.allclose(got[r, mask[r].bool()], qm(p[None]).logits[0], rtol=1e-4, atol=1e-4)


def test_a_decode_step_captured_for_two_or_more_tokens_falls_back_to_the_padded_step():
    """OPT computes positions from the attention mask when given none, captured with a
    data-dependent length >= 2: its plain one-token step would fail with torch's bare runtime
    assertion. generate takes the padded step (positions as an input) instead; exporting the plain
    step is refused by name, with the way out."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    qm = pt2pass.compile(transformers.OPTForCausalLM(config).eval(), None, config=CompileConfig(ternary=RTN),
                         progress=False)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(9))
    assert torch.equal(qm.generate(ids, 6), qm.generate_no_cache(ids, 6))
    assert [decoder.padded for decoder in qm._decoders.values()] == [True]
    with pytest.raises(NotImplementedError, match=r"OPTForCausalLM's static-cache decode step was captured "
                                                  r"for two or more tokens only .*padded=True"):
        pt2pass.export(qm, graph="decode", batch_size=2, max_cache_len=32)
    ep = pt2pass.export(qm, graph="decode", batch_size=2, max_cache_len=32, padded=True)
    assert torch.equal(generate_with_program(ep, ids, 6), qm.generate(ids, 6))


def test_falcon_linear_that_bypasses_aten_linear_is_named():
    """Falcon's FalconLinear subclasses nn.Linear but computes input @ weight.T itself."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       new_decoder_architecture=False)
    with pytest.raises(ValueError, match=r"FalconForCausalLM: no Linear layer can be ternarized \(Linear weights in "
                                         r"the graph: lm_head\.weight skipped .*\)\. 4 nn\.Linear module\(s\) never "
                                         r"run as aten\.linear, e\.g\. transformer\.h\.0\.self_attention\."
                                         r"query_key_value \(FalconLinear\)"):
        pt2pass.compile(transformers.FalconForCausalLM(config).eval(), None, config=CompileConfig(ternary=RTN),
                        progress=False)


MORE_ARCHITECTURES = {  # name: (config class, model class, settings besides the tiny sizes)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),   # fused qkv_proj, gate_up_proj
    "phi": ("PhiConfig", "PhiForCausalLM", {}),                      # parallel attention + MLP, biases
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),  # soft-capping, sliding layers
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),  # no GQA
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"pad_token_id": 0}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "glm": ("GlmConfig", "GlmForCausalLM", {"pad_token_id": 0}),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", {"head_dim": 16}),  # sliding layers
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {}),  # sliding layers, q/k norms
    # global layers with a head_dim of their own: the static cache is sized by cache_shapes' probe
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {"sliding_window": 8}),   # sliding layers
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {"sliding_window": 8}),  # sliding layers
}


@pytest.mark.parametrize("arch", list(MORE_ARCHITECTURES))
def test_more_architectures_ternarize_every_linear_and_generate_like_the_no_cache_loop(arch):
    config_cls, model_cls, extra = MORE_ARCHITECTURES[arch]
    settings = {**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False), **extra}
    config = getattr(transformers, config_cls)(**{k: v for k, v in settings.items() if v is not None})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    qm = pt2pass.compile(model, None, config=CompileConfig(ternary=RTN), progress=False)
    assert qm.ternary_node_count() == len(linear_weight_fqns(model) - {"lm_head.weight"})
    logits, _ = _logits(qm, model)
    assert torch.isfinite(logits).all()
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(9))
    assert torch.equal(qm.generate(ids, 6), qm.generate_no_cache(ids, 6))
