"""Model -> aten-level GraphModule, with every Linear node tagged by its weight FQN and a stage.

Capture uses ``torch.export`` (``torch.fx.symbolic_trace`` cannot trace modern HF models). HF
causal LMs are traced with ``use_cache=False`` and a dynamic batch and sequence length, so one graph
serves calibration, scoring and any prompt length. Nodes are grouped into *stages* (embedding, each
decoder block, head) from ``node.meta["nn_module_stack"]``: the calibration loop walks them in order.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .experts import WEIGHT_FQN, experts_nodes, tag_experts

log = logging.getLogger(__name__)

LINEAR_OP = torch.ops.aten.linear.default
STAGE = "pt2pass_stage"
PRE_STAGE, POST_STAGE, WHOLE_STAGE = "embedding", "head", "model"


class CaptureError(RuntimeError):
    """torch.export could not trace the model; the message says what failed and what to try."""


def is_hf_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_output_embeddings")


def example_inputs_for(model: nn.Module, example_inputs=None) -> Tuple[tuple, dict]:
    """(args, kwargs) used for tracing. HF causal LMs get ``input_ids`` and ``use_cache=False``."""
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            return (), dict(example_inputs)
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,), {}
        return tuple(example_inputs), {}
    if not is_hf_causal_lm(model):
        raise ValueError("example_inputs are required for a model that is not a Hugging Face causal LM")
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (2, 16), device=device)
    return (), {"input_ids": ids, "use_cache": False}


def _dynamic_shapes(args: tuple, kwargs: dict):
    """Every dimension of every tensor input may vary (export specialises only what it must)."""
    def spec(value):
        if isinstance(value, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d in range(value.dim())}
        return None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


_ABSENT = object()


@contextlib.contextmanager
def _keywords_named(model: nn.Module, kwargs: dict) -> Iterator[None]:
    """While exporting, give ``model`` a forward that names every keyword input: torch.export
    cannot take dynamic shapes for inputs that only a ``**kwargs`` parameter receives (GraniteMoe's
    ``forward(input_ids, ..., **kwargs)`` with ``use_cache``). The model's own forward (a hook's
    wrapper included) does the work, and is put back afterwards."""
    original = model.forward
    params = inspect.signature(original).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_var_kw or all(k in params for k in kwargs):
        yield
        return

    def forward(**inputs):
        return original(**inputs)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for k in kwargs])
    own = model.__dict__.get("forward", _ABSENT)  # e.g. accelerate's hook wrapper
    model.forward = forward
    try:
        yield
    finally:
        if own is _ABSENT:
            del model.forward
        else:
            model.forward = own


def capture(model: nn.Module, example_inputs=None) -> fx.GraphModule:
    """Export ``model`` into an aten-level GraphModule, tagging Linear nodes and stages.

    The returned module shares parameter storage with ``model``: passes must never write to
    those tensors in place (they register new attributes instead).
    """
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers: nothing to ternarize")
    args, kwargs = example_inputs_for(model, example_inputs)
    if args and kwargs:
        raise ValueError("give example_inputs either as a tuple of positional inputs or as a dict")
    dynamic = _dynamic_shapes(args, kwargs)
    try:
        with torch.no_grad(), _keywords_named(model, kwargs):
            ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with guidance
        raise CaptureError(capture_error_message(model, exc)) from exc
    gm = ep.module()
    tag_linears(gm, model)
    tag_experts(gm, model)
    tag_stages(gm, model)
    return gm


def capture_error_message(model: nn.Module, exc: BaseException) -> str:
    """What failed (the exception's first line), where (the innermost submodule of ``model`` whose
    code was running, with file, line and source) and what to do about it."""
    summary = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    lines = [f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {summary}"]
    site = failing_site(model, exc)
    if site is not None:
        fqn, cls, where, code = site
        lines.append(f"failing construct: `{code}` at {where}, in the forward of submodule "
                     f"{fqn!r} ({cls})" if fqn else
                     f"failing construct: `{code}` at {where}, in the forward of {cls}")
    data_dependent = "data-dependent" in str(exc) or "GuardOnDataDependent" in type(exc).__name__
    if data_dependent:
        lines.append("Python control flow on a tensor's value (`if x.sum() > 0:`, `while`, "
                     "`.item()`) cannot be captured: rewrite it with torch.where or torch.cond.")
    lines.append(
        "The whole forward must be traceable: CompileConfig.skip only keeps Linears in full "
        "precision, it does not exclude code from capture. To leave the construct out, compile the "
        "traceable submodules on their own (pt2pass.compile(model.<submodule>, calib, "
        "example_inputs=...)) and assign the results back in their place; give example_inputs "
        "that match the forward's signature; HF models must be called with use_cache=False.")
    return "\n".join(lines)


def failing_site(model: nn.Module, exc: BaseException) -> Optional[Tuple[str, str, str, str]]:
    """(submodule FQN, class name, "file:line", source line) of the innermost forward frame of a
    submodule of ``model`` in the traceback of ``exc`` or of its causes; None if there is none
    (non-strict export runs the user's Python, so the frames are in the traceback)."""
    names = {id(m): name for name, m in model.named_modules()}
    seen, found = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            owner = frame.f_locals.get("self")
            if (isinstance(owner, nn.Module) and id(owner) in names
                    and frame.f_code.co_filename != _MODULE_FILE):  # not nn.Module.__call__
                code = linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()
                found = (names[id(owner)], type(owner).__name__,
                         f"{frame.f_code.co_filename}:{tb.tb_lineno}", code)
            tb = tb.tb_next
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


_MODULE_FILE = nn.modules.module.__file__


def unsupported_weight_modules(model: nn.Module) -> List[str]:
    """"fqn (Class)" of the modules that hold a 2-D weight but are not nn.Linear (nor an
    embedding), e.g. transformers' Conv1D in GPT-2: their matmuls are not aten.linear calls, so
    pt2pass cannot ternarize them."""
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 2
                and not isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag))):
            found.append(f"{name} ({type(module).__name__})")
    return found


def weights_outside_linears(model: nn.Module) -> List[Tuple[str, int]]:
    """(fqn, numel) of the parameters with >= 2 dimensions held by modules other than nn.Linear
    and embeddings: e.g. the 3-D expert tensors of transformers' MoE blocks or GPT-2's Conv1D.
    pt2pass leaves them in full precision."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2:
                found.append((f"{name}.{pname}" if name else pname, p.numel()))
    return found


def tag_linears(gm: fx.GraphModule, model: nn.Module) -> Dict[str, fx.Node]:
    """Set ``meta[WEIGHT_FQN]`` on each aten.linear whose weight is a parameter of ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    found = {}
    for node in gm.graph.nodes:
        if node.target is not LINEAR_OP:
            continue
        weight = node.args[1]
        if weight.op != "get_attr" or weight.target not in params:
            log.warning("linear node %s has a computed weight; it stays in full precision", node.name)
            continue
        node.meta[WEIGHT_FQN] = weight.target
        found[weight.target] = node
    return found


def linear_nodes(gm: fx.GraphModule) -> Dict[str, fx.Node]:
    """Weight FQN -> aten.linear node, for the Linear nodes tagged at capture."""
    return {n.meta[WEIGHT_FQN]: n for n in gm.graph.nodes
            if n.target is LINEAR_OP and WEIGHT_FQN in n.meta}


def require_captured(gm: fx.GraphModule, who: str) -> None:
    """Refuse a graph whose Linears :func:`tag_linears` did not tag: a quantizer would find
    nothing to do, and lowering would drop parameters that a torch.fx.symbolic_trace graph shares
    with the user's model."""
    if not linear_nodes(gm) and not experts_nodes(gm):
        raise ValueError(f"{who}: the graph has no Linear nodes tagged by pt2pass.capture; capture "
                         "the model with pt2pass.capture(model) (torch.fx.symbolic_trace and "
                         "plain torch.export graphs are not tagged)")


def find_blocks(model: nn.Module) -> List[str]:
    """FQNs of the repeated blocks: the children of the ModuleList/Sequential with most Linear-holding
    children (``model.layers.0`` … for HF decoders). Empty if the model has no such container."""
    best: List[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [f"{name}.{c}" if name else c for c, sub in module.named_children()
                    if any(isinstance(m, nn.Linear) for m in sub.modules())]
        if len(children) > len(best):
            best = children
    return best


def tag_stages(gm: fx.GraphModule, model: nn.Module) -> List[str]:
    """Assign ``meta[STAGE]`` to every node; return the stage names in execution order.

    Nodes inside a block take the block's FQN; nodes before the first block form the embedding
    stage, nodes after the last one the head; glue between two blocks stays with the earlier one.
    """
    blocks = find_blocks(model)
    pattern = re.compile("^(" + "|".join(re.escape(b) for b in blocks) + r")(\.|$)") if blocks else None
    nodes = list(gm.graph.nodes)
    found = [_block_of(n, pattern) for n in nodes]
    last = max((i for i, b in enumerate(found) if b is not None), default=-1)
    current = PRE_STAGE if blocks else WHOLE_STAGE
    order: List[str] = []
    for i, (node, block) in enumerate(zip(nodes, found)):
        current = block or (POST_STAGE if 0 <= last < i else current)
        node.meta[STAGE] = current
        if node.op == "call_function" and (not order or order[-1] != current):
            order.append(current)
    gm.meta["pt2pass_stages"] = order
    return order


def _block_of(node: fx.Node, pattern) -> Optional[str]:
    if pattern is None or node.op != "call_function":
        return None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = pattern.match(path)
        if match:
            return match.group(1)
    return None


def stages(gm: fx.GraphModule) -> List[str]:
    """Stage names in execution order (see :func:`tag_stages`)."""
    return list(gm.meta.get("pt2pass_stages", []))
