"""QuantizedModel: the module ``pt2pass.compile`` returns.

It wraps the lowered GraphModule and is called like the original model (an HF causal LM returns
an output with ``.logits``). It carries the quantization store (per-layer results and report).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
from torch import nn

from .lowering.lower import TERNARY_OP
from .store import QuantStore


class QuantizedModel(nn.Module):
    """A compiled module taking the same positional inputs as the captured one."""

    causal_lm = False

    def __init__(self, graph: fx.GraphModule, store: QuantStore, model_config: Any = None,
                 pass_history: Optional[list] = None):
        super().__init__()
        _freeze_parameters(graph)
        self.gm = graph
        self.store = store
        self.model_config = model_config
        self.pass_history = list(pass_history or [])

    def forward(self, *args):
        return self.gm(*args)

    def report(self) -> List[Dict[str, Any]]:
        """Per-layer quantization report (E_w, E_x after ITF and AGA, block order, time)."""
        return self.store.report()

    def ternary_node_count(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.target is TERNARY_OP)



class QuantizedCausalLM(QuantizedModel):
    """A compiled HF causal LM: ``qm(input_ids).logits`` as with the original model."""

    causal_lm = True

    def forward(self, input_ids: torch.Tensor):
        return self.gm(input_ids=input_ids, use_cache=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding by re-running the full sequence each step (no KV cache)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids).logits[:, -1, :]
            next_id = logits.argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            if eos_token_id is not None and bool((next_id == eos_token_id).all()):
                break
        return ids


def _freeze_parameters(gm: fx.GraphModule) -> None:
    """Inference only: give the graph frozen views of its remaining parameters (same storage, new
    Parameter objects) so that the user's model keeps its own ``requires_grad`` flags."""
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        if param.requires_grad:
            prefix, _, attr = name.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            setattr(owner, attr, nn.Parameter(param.detach(), requires_grad=False))
