"""pt2pass: post-training ternarization (PT²-LLM) as a PyTorch 2 compiler pass pipeline."""
from . import lowering  # noqa: F401  (registers the custom ops)
