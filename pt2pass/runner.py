"""Execute a captured graph node by node over several calibration batches at once.

Why not ``torch.fx.Interpreter``: sequential quantization needs *all* batches' inputs of a Linear
(to build its Hessian) before that Linear's output can be computed with the quantized weight, so
the loop must be node-major, batch-minor. Values that differ per batch are held as
:class:`PerBatch` lists; values that do not (weights, shapes) are held once. A value is dropped as
soon as its last user has run, so at most the activations live across one point of the graph stay
in memory (for a decoder: about one stage's worth). ``peak_bytes`` records the most activation
bytes held at once (distinct storages, so views are not counted twice).

Offload (``offload_to="cpu"``): per-batch values are stored on the CPU and each batch is moved to
the compute device only while a node runs on it, so the accelerator holds one batch's values
instead of the whole calibration set's. Values that are the same for every batch stay put.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch.fx.node import map_aggregate, map_arg

from .capture import STAGE
from .data import check_token_ids


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
    """``targets`` and every node they depend on, including in-place writes (``aten.copy_`` into
    a slice of a ``new_empty`` buffer, as DeepSeek-V2's attention does) into a tensor they read:
    data flow alone misses those, and the buffer would be read uninitialised."""
    targets = list(targets)
    if not targets:
        return set()
    writes = [(n, _storage_base(m)) for n in targets[0].graph.nodes
              if (m := _mutated_arg(n)) is not None]
    seen: Set[fx.Node] = set()
    stack = targets
    while stack:
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            stack.extend(node.all_input_nodes)
        stack = [w for w, base in writes if base in seen and w not in seen]
    return seen


def _mutated_arg(node: fx.Node) -> Optional[fx.Node]:
    """The argument an in-place op writes into, or None."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    for i, arg in enumerate(target._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, fx.Node) else None
    return None


def _storage_base(node: fx.Node) -> fx.Node:
    """Follow view ops (slice, select, view, ...) back to the tensor whose storage they share."""
    while (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
           and node.target._schema.returns and node.target._schema.returns[0].alias_info is not None
           and node.args and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node


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

    ``batches`` is a list of (args, kwargs) pairs, each a valid call of the captured model; nodes
    compute on the device of the batches' tensors. ``offload_to``: where per-batch values are
    kept between nodes (None: where they were computed). ``self.weights`` maps get_attr targets
    to replacement tensors (e.g. already-quantized weights).
    """

    def __init__(self, gm: fx.GraphModule, batches: List[Tuple[tuple, dict]],
                 targets: Iterable[fx.Node], offload_to: Union[str, torch.device, None] = None):
        self.gm = gm
        self.offload_to = torch.device(offload_to) if offload_to is not None else None
        self.compute_device = _device_of_batches(gm, batches)
        self.peak_bytes = 0
        # node -> [(storage key, bytes)] of its stored value, and value dicts held outside env
        # (see pin): what live_bytes() counts.
        self._footprint: Dict[fx.Node, List[Tuple[Any, int]]] = {}
        self._pinned: List[Dict[fx.Node, Any]] = []
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
        self._inputs = {n: PerBatch([self._keep(f[i]) for f in flat])
                        for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}

    def segments(self) -> List[Tuple[str, List[fx.Node]]]:
        return stage_segments(self.nodes)

    def run_node(self, node: fx.Node) -> Any:
        """Compute ``node`` for every batch, store it, and drop inputs that are no longer needed."""
        value = self.env[node] = self._compute(node)
        self._footprint[node] = _footprint(value) if isinstance(value, PerBatch) else []
        # the peak is now: this node's inputs are still held while its output exists
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        for inp in node.all_input_nodes:
            if self.last_use.get(inp, -1) <= self.position[node]:
                self.env.pop(inp, None)
        return self.env[node]

    def value(self, node: fx.Node) -> Any:
        return self._resolve(node)

    def live_bytes(self) -> int:
        """Bytes of the per-batch values held now (in env or pinned), each storage counted once."""
        held: Dict[Any, int] = {}
        for values in (self.env, *self._pinned):
            for node in values:
                held.update(self._footprint.get(node, ()))
        return sum(held.values())

    def pin(self, values: Dict[fx.Node, Any]) -> Dict[fx.Node, Any]:
        """Count ``values`` (node -> value, e.g. a snapshot of env) as held until :meth:`unpin`."""
        self._pinned.append(values)
        return values

    def unpin(self, values: Dict[fx.Node, Any]) -> None:
        self._pinned = [p for p in self._pinned if p is not values]  # identity: values hold tensors

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
        return PerBatch([self._keep(node.target(*self._fetch(_pick(args, i)),
                                                **self._fetch(_pick(kwargs, i))))
                         for i in range(n_batches)])

    def _keep(self, value):
        """A per-batch value as stored between nodes (on the offload device, if any)."""
        return value if self.offload_to is None else _move(value, self.offload_to)

    def _fetch(self, value):
        """A stored per-batch value brought back to the compute device for a node to use."""
        return value if self.offload_to is None else _move(value, self.compute_device)


def _move(tree, device: torch.device):
    return map_aggregate(tree, lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)


def _footprint(value: PerBatch) -> List[Tuple[Any, int]]:
    """(storage key, bytes) of every tensor in the value; views of one storage share the key."""
    out: List[Tuple[Any, int]] = []

    def add(v):
        if isinstance(v, torch.Tensor):
            storage = v.untyped_storage()
            out.append(((v.device, storage.data_ptr()), storage.nbytes()))
    map_aggregate(value.values, add)
    return out


def _device_of_batches(gm: fx.GraphModule, batches) -> torch.device:
    """Where the nodes compute: the device of the first input tensor (else of the parameters)."""
    found: List[torch.device] = []
    map_aggregate([list(a) + list(k.values()) for a, k in batches],
                  lambda v: found.append(v.device) if isinstance(v, torch.Tensor) else None)
    if found:
        return found[0]
    param = next(iter(gm.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


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


def causal_lm_batches(token_ids: torch.Tensor, batch_size: int, device: Optional[torch.device] = None,
                      *, vocab_size: Optional[int] = None) -> List[Tuple[tuple, dict]]:
    """Calibration batches for a graph captured from an HF causal LM: (n, seqlen) ids cut into
    ``batch_size`` rows each, as the keyword call the graph was traced with. The ids are checked
    here (2-D integers, none negative, below ``vocab_size`` when given), not deep in the first
    pass that runs the graph."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"calibration ids must be a 2-D (n, seqlen) tensor, got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    token_ids = check_token_ids(token_ids, vocab_size, "calibration ids")
    chunks = token_ids.to(device).split(batch_size) if device is not None else token_ids.split(batch_size)
    return [((), {"input_ids": c, "use_cache": False}) for c in chunks]
