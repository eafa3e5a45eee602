"""Which Linear nodes a quantization pass rewrites, and how their weights are replaced."""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..capture import LINEAR_OP, WEIGHT_FQN
from ..lowering.lower import GATHER, INPUT_PERMUTED, OUTPUT_PERM

log = logging.getLogger(__name__)


PACKING_UNIT = 16  # weights per int32 word of the packed format (lowering/format.py)


def require_unpermuted(gm: fx.GraphModule, who: str) -> None:
    """Refuse to quantize a graph into which SSR permutations were already inserted or folded:
    the new quantization would describe permuted weights that lowering permutes again."""
    marked = next((n for n in gm.graph.nodes
                   if any(key in n.meta for key in (GATHER, INPUT_PERMUTED, OUTPUT_PERM))), None)
    if marked is not None:
        raise ValueError(f"{who}: SSR permutations were already inserted or folded into this graph "
                         f"(node {marked.name}): quantize before InsertPermutations / "
                         "FoldPermutations")


def quantizable_linears(gm: fx.GraphModule, skip: Iterable[str] = ()) -> Dict[str, fx.Node]:
    """Weight FQN -> its aten.linear node, for the Linears a quantizer should rewrite.

    Left out (and logged, see :func:`classify_linears`): FQNs containing a ``skip`` substring;
    weights also read by other ops (tied weights, e.g. an LM head tied to the embedding:
    quantizing would change the embedding too); weights used by more than one Linear call;
    in_features not a multiple of 16 (the packing unit of the ternary format).
    """
    sites, excluded = classify_linears(gm, skip)
    warn_excluded(excluded)
    return sites


def warn_excluded(excluded: Dict[str, str]) -> None:
    """Log why each weight stays in full precision (a skip is the user's choice: no warning)."""
    for fqn, reason in excluded.items():
        if not reason.startswith(SKIPPED):
            log.warning("%s %s: kept in full precision", fqn, reason)


SKIPPED = "skipped by CompileConfig.skip"


def tagged_by_weight(gm: fx.GraphModule, is_site, skip: Iterable[str], excluded: Dict[str, str]
                     ) -> Dict[str, list]:
    """Weight FQN -> the tagged nodes ``is_site`` accepts, for the FQNs no ``skip`` entry matches
    and whose in_features the ternary format can pack (the others go to ``excluded``, with why)."""
    by_fqn: Dict[str, list] = {}
    for node in gm.graph.nodes:
        if is_site(node) and WEIGHT_FQN in node.meta:
            by_fqn.setdefault(node.meta[WEIGHT_FQN], []).append(node)
    for fqn in list(by_fqn):
        matched = [s for s in skip if s in fqn]
        k = get_weight(gm, fqn).shape[-1]
        if matched:
            excluded[fqn] = f"{SKIPPED} ({matched[0]!r})"
        elif k % PACKING_UNIT:
            excluded[fqn] = (f"has in_features={k}, not a multiple of {PACKING_UNIT} (the packing unit "
                             "of the ternary format)")
        else:
            continue
        del by_fqn[fqn]
    return by_fqn


def classify_linears(gm: fx.GraphModule, skip: Iterable[str] = ()
                     ) -> Tuple[Dict[str, fx.Node], Dict[str, str]]:
    """(quantizable sites: weight FQN -> aten.linear node, excluded: weight FQN -> reason)."""
    sites, excluded = {}, {}
    by_fqn = tagged_by_weight(gm, lambda n: n.target is LINEAR_OP, tuple(skip), excluded)
    readers = readers_by_tensor(gm)
    for fqn, nodes in by_fqn.items():
        weight = get_weight(gm, fqn)
        other_users = [u for u in readers.get(id(weight), []) if u not in nodes]
        if other_users:
            excluded[fqn] = f"is tied (also used by {', '.join(u.name for u in other_users)})"
            continue
        if len(nodes) > 1:
            excluded[fqn] = f"is used by {len(nodes)} Linear calls"
            continue
        sites[fqn] = nodes[0]
    return sites, excluded


def readers_by_tensor(gm: fx.GraphModule) -> Dict[int, list]:
    """id(tensor) -> the nodes reading it through any get_attr: a tie can appear as one
    get_attr node with several users or as two attribute names of one Parameter."""
    readers: Dict[int, list] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                tensor = get_weight(gm, node.target)
            except AttributeError:
                continue
            readers.setdefault(id(tensor), []).extend(node.users)
    return readers


def set_weight(gm: fx.GraphModule, fqn: str, value: torch.Tensor) -> None:
    """Replace the parameter ``fqn`` of ``gm`` by ``value`` without touching the old tensor
    (which the user's model still owns)."""
    owner_name, _, attr = fqn.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    setattr(owner, attr, nn.Parameter(value, requires_grad=False))


def get_weight(gm: fx.GraphModule, fqn: str) -> torch.Tensor:
    owner_name, _, attr = fqn.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    return getattr(owner, attr)
