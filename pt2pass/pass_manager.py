"""Pass base class and PassManager (modelled on torch.fx.passes.infra).

A pass is a small object with ``call(gm) -> PassResult(gm, modified)``, optional ``requires``
(preconditions) and ``ensures`` (postconditions). The manager runs passes in order, lints the
graph and checks each pass's postconditions after it runs, logs timing, and on failure raises a
:class:`PassError` naming the failing pass and the passes that ran before it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, Sequence

import torch.fx as fx

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class Pass:
    """Base class: subclasses implement :meth:`call`; ``requires``/``ensures`` raise on violation."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, gm: fx.GraphModule) -> None:
        """Preconditions on the input graph (raise to refuse)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        """Postconditions on the output graph (raise when violated)."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        return self.call(gm)

    def __repr__(self) -> str:
        return f"{self.name}()"


class PassError(RuntimeError):
    """A pass failed (or broke the graph); the message names it and the passes before it."""


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float


@dataclass
class PassManager:
    """Run ``passes`` in order over a GraphModule, checking the graph after each one."""

    passes: Sequence[Pass]
    check: bool = True
    history: List[PassRecord] = field(default_factory=list)

    def __post_init__(self):
        self.passes = list(self.passes)  # a generator would be used up by the check below
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, got {p!r} ({type(p).__name__})")

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return self.run(gm)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.history = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p(gm)
                if not isinstance(result, PassResult):
                    raise TypeError(f"{p.name}.call must return a PassResult, got {type(result).__name__}")
                gm = result.graph_module
                if self.check:
                    self._check(gm, p)
            except PassError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised with the pipeline context
                before = [r.name for r in self.history]
                raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc} "
                                f"(passes run before it: {before or 'none'})") from exc
            seconds = time.perf_counter() - start
            self.history.append(PassRecord(p.name, result.modified, seconds))
            log.info("pass %s: %s in %.2f s", p.name, "modified" if result.modified else "unchanged",
                     seconds)
        return gm

    @staticmethod
    def _check(gm: fx.GraphModule, p: Pass) -> None:
        gm.graph.lint()
        gm.recompile()
        p.ensures(gm)
