"""Execute a captured graph node by node over several calibration batches at once.

Why not ``torch.fx.Interpreter``: sequential quantization needs *all* batches' inputs of a Linear
(to build its Hessian) before that Linear's output can be computed with the quantized weight, so
the loop must be node-major, batch-minor. Values that differ per batch are held as
:class:`PerBatch` lists; values that do not (weights, shapes) are held once. A value is dropped as
soon as its last user has run, so at most the activations live across one point of the graph stay
in memory (for a decoder: about one stage's worth).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch.fx.node import map_aggregate, map_arg

from .capture import STAGE


@dataclass
class PerBatch:
    """One value per calibration batch."""

    values: List[Any]


def flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> List[Any]:
    """Flatten (args, kwargs) into the graph's placeholder order (the export in_spec)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(args) + list(kwargs.values())
    return fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), spec)


def ancestors(targets: Iterable[fx.Node]) -> Set[fx.Node]:
    """``targets`` and every node they depend on."""
    seen: Set[fx.Node] = set()
    stack = list(targets)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def stage_segments(nodes: Sequence[fx.Node]) -> List[Tuple[str, List[fx.Node]]]:
    """Split nodes (graph order) into consecutive runs of one stage."""
    segments: List[Tuple[str, List[fx.Node]]] = []
    for node in nodes:
        stage = node.meta.get(STAGE, "model")
        if not segments or segments[-1][0] != stage:
            segments.append((stage, []))
        segments[-1][1].append(node)
    return segments


class BatchedGraphRunner:
    """Runs the nodes of ``gm`` needed for ``targets`` over ``batches`` of inputs.

    ``batches`` is a list of (args, kwargs) pairs, each a valid call of the captured model.
    ``self.weights`` maps get_attr targets to replacement tensors (e.g. already-quantized weights).
    """

    def __init__(self, gm: fx.GraphModule, batches: List[Tuple[tuple, dict]],
                 targets: Iterable[fx.Node]):
        self.gm = gm
        self.batches = batches
        needed = ancestors(targets)
        # get_attr nodes are resolved on demand (see _resolve) so that a weight replaced after
        # its get_attr node was reached is still seen by the Linears that come later.
        self.nodes = [n for n in gm.graph.nodes if n in needed and n.op != "get_attr"]
        position = {n: i for i, n in enumerate(self.nodes)}
        self.last_use: Dict[fx.Node, int] = {}
        for node in self.nodes:
            for user in node.users:
                if user in position:
                    self.last_use[node] = max(self.last_use.get(node, -1), position[user])
        self.position = position
        self.env: Dict[fx.Node, Any] = {}
        self.weights: Dict[str, torch.Tensor] = {}
        flat = [flatten_inputs(gm, a, k) for a, k in batches]
        self._inputs = {n: PerBatch([f[i] for f in flat])
                        for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}

    def segments(self) -> List[Tuple[str, List[fx.Node]]]:
        return stage_segments(self.nodes)

    def run_node(self, node: fx.Node) -> Any:
        """Compute ``node`` for every batch, store it, and drop inputs that are no longer needed."""
        self.env[node] = self._compute(node)
        for inp in node.all_input_nodes:
            if self.last_use.get(inp, -1) <= self.position[node]:
                self.env.pop(inp, None)
        return self.env[node]

    def value(self, node: fx.Node) -> Any:
        return self._resolve(node)

    def _resolve(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            if node.target in self.weights:
                return self.weights[node.target]
            return _fetch_attr(self.gm, node.target)
        return self.env[node]

    def _compute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self._inputs[node]
        if node.op != "call_function":
            raise NotImplementedError(f"calibration cannot run node {node.name} of kind {node.op}")
        args = map_arg(node.args, self._resolve)
        kwargs = map_arg(node.kwargs, self._resolve)
        n_batches = _batch_count((args, kwargs))
        if n_batches is None:
            return node.target(*args, **kwargs)
        return PerBatch([node.target(*_pick(args, i), **_pick(kwargs, i)) for i in range(n_batches)])


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _batch_count(tree) -> Optional[int]:
    found: List[int] = []
    map_aggregate(tree, lambda v: found.append(len(v.values)) if isinstance(v, PerBatch) else None)
    return found[0] if found else None


def _pick(tree, i: int):
    return map_aggregate(tree, lambda v: v.values[i] if isinstance(v, PerBatch) else v)


def causal_lm_batches(token_ids: torch.Tensor, batch_size: int,
                      device: Optional[torch.device] = None) -> List[Tuple[tuple, dict]]:
    """Calibration batches for a graph captured from an HF causal LM: (n, seqlen) ids cut into
    ``batch_size`` rows each, as the keyword call the graph was traced with."""
    chunks = token_ids.to(device).split(batch_size) if device is not None else token_ids.split(batch_size)
    return [((), {"input_ids": c, "use_cache": False}) for c in chunks]
