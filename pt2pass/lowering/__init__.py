"""Lowering of ternarized Linears to the ``pt2pass::ternary_linear`` custom op."""
from . import ops  # noqa: F401  (registers torch.ops.pt2pass.ternary_linear)
from .format import FORMAT_VERSION, PackedTernary, dequantize, pack_ternary, unpack_ternary

__all__ = ["FORMAT_VERSION", "PackedTernary", "dequantize", "pack_ternary", "unpack_ternary"]
