"""Register Hugging Face model-output classes as pytree nodes on ``import pt2pass``.

A program exported from an HF causal LM returns e.g. ``CausalLMOutputWithPast``; torch.export.load
can only rebuild that output if the class is registered with pytree, which transformers does when
``transformers.modeling_outputs`` is imported. Importing it here makes ``import pt2pass`` enough to
load any ExportedProgram pt2pass produced.
"""
try:
    import transformers.modeling_outputs  # noqa: F401
except ImportError:  # transformers is a dependency, but keep pt2pass importable without it
    pass
