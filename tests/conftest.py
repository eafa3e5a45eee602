# TRITON_INTERPRET must be set before triton is imported anywhere (transformers imports it), so
# the CPU test suite runs the real Triton kernels in the interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's on-disk FX graph cache keys a triton_op by its graph, not by its Python body: after
# an edit of the op's reference path it can replay stale code. Tests always compile afresh.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32) and its tokenizer, loaded once per session."""
    from pt2pass.models import load_smollm2

    torch.manual_seed(0)
    return load_smollm2()


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


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
