# TRITON_INTERPRET must be set before triton is imported anywhere (transformers imports it), so
# the CPU test suite runs the real Triton kernels in the interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# torch's on-disk compile caches (AOTAutograd's above all, pytorch#160472) key a triton_op by its
# graph, not by its Python body: after an edit of the op it can replay stale code (see
# lowering.ops.compile_fresh). Tests always compile afresh.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
# Under pytest-xdist (`pytest -n N`) every worker, and the subprocesses it starts, computes on one
# thread: N workers on N cores instead of N x cores threads fighting over them.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32) and its tokenizer, loaded once per session."""
    from pt2pass.models import load_smollm2

    torch.manual_seed(0)
    return load_smollm2()


class ByteTokenizer:
    """Fake HF tokenizer: one token per UTF-8 byte, so expected windows are easy to compute."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, **kwargs):
        self.calls.append(kwargs)
        return {"input_ids": list(text.encode("utf-8"))}


def make_tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised LLaMA small enough for unit tests (in_features multiples of 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    return model


MOE = {"mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
       "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 64})}


def make_tiny_moe(arch: str, layers: int = 2):
    """A random MoE causal LM of transformers 5 (experts as 3-D tensors): 4 experts, top-2."""
    import transformers

    config_cls, model_cls, extra = MOE[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        num_experts_per_tok=2, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def ternarized_graph(model, ternary=None, n_calib: int = 4, seqlen: int = 32):
    """``model`` captured and run through SequentialTernarize on seeded random calibration ids."""
    from pt2pass import CompileConfig, PassManager, SequentialTernarize, TernaryConfig, capture
    from pt2pass.runner import causal_lm_batches

    ids = torch.randint(0, model.config.vocab_size, (n_calib, seqlen),
                        generator=torch.Generator().manual_seed(0))
    config = CompileConfig(seqlen=seqlen, ternary=ternary or TernaryConfig())
    return PassManager([SequentialTernarize(causal_lm_batches(ids, 2), config, progress=False)])(
        capture(model))


def clone_graph(gm):
    """A deep copy of a GraphModule including its meta (where the quantization store lives)."""
    import copy

    out = copy.deepcopy(gm)
    out.meta = copy.deepcopy(gm.meta)
    return out


def random_ternary_layer_cpu(n: int, k: int, seed: int, bias: bool, perm: bool, dtype):
    """(packed codes, alpha, mu, bias or None, SSR permutation or None) of a random (n, k) layer."""
    from pt2pass.lowering.format import pack_ternary

    g = torch.Generator().manual_seed(seed)
    T = torch.randint(-1, 2, (n, k), generator=g)
    alpha = ((torch.rand(n, k // 128, generator=g) + 0.5) * 0.1).to(dtype)
    mu = (torch.randn(n, k // 128, generator=g) * 0.02).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    p = torch.randperm(k, generator=g) if perm else None
    return pack_ternary(T), alpha, mu, b, p


def gemv_vs_reference(gemv, x, n: int, seed: int, bias=False, perm=False, split=1, **launcher_kwargs):
    """(out, float64 reference) of ``gemv`` (a launcher writing into a NaN-poisoned ``out``) on a
    random layer of n rows."""
    from pt2pass.lowering.reference import ternary_linear_reference

    packed, alpha, mu, b, p = random_ternary_layer_cpu(n, x.shape[1], seed, bias, perm, x.dtype)
    ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                   None if b is None else b.double(), p)
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)
    gemv(x, packed, alpha, mu, b, p, out, split=split, **launcher_kwargs)
    return out, ref


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def dequantized_copy(model, qm, block_size: int):
    """A copy of ``model`` whose quantized weights are replaced by alpha * T + mu (input order
    restored): what the lowered graph must compute, Linear by Linear."""
    import copy

    from pt2pass.quant import dequantize_blocks, unpermute

    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters(remove_duplicate=False))
    for fqn in qm.store:
        layer = qm.store[fqn]
        params[fqn].data.copy_(unpermute(dequantize_blocks(layer.T, layer.alpha, layer.mu, block_size), layer.perm))
    return ref
