"""Which Linear nodes a quantization pass rewrites, and how their weights are replaced."""
from __future__ import annotations

import logging
from typing import Dict, Iterable

import torch
import torch.fx as fx
from torch import nn

from ..capture import LINEAR_OP, WEIGHT_FQN

log = logging.getLogger(__name__)


def quantizable_linears(gm: fx.GraphModule, skip: Iterable[str] = ()) -> Dict[str, fx.Node]:
    """Weight FQN -> its aten.linear node, for the Linears a quantizer should rewrite.

    Left out (and logged): FQNs containing a ``skip`` substring; weights also read by other ops
    (tied weights, e.g. an LM head tied to the embedding: quantizing would change the embedding
    too); weights used by more than one Linear call.
    """
    skip = tuple(skip)
    by_fqn: Dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.target is LINEAR_OP and WEIGHT_FQN in node.meta:
            by_fqn.setdefault(node.meta[WEIGHT_FQN], []).append(node)
    sites = {}
    for fqn, nodes in by_fqn.items():
        if any(s in fqn for s in skip):
            continue
        weight = nodes[0].args[1]
        other_users = [u for u in weight.users if u not in nodes]
        if other_users:
            log.warning("%s is tied (also used by %s): kept in full precision", fqn,
                        ", ".join(u.name for u in other_users))
            continue
        if len(nodes) > 1:
            log.warning("%s is used by %d Linear calls: kept in full precision", fqn, len(nodes))
            continue
        sites[fqn] = nodes[0]
    return sites


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
