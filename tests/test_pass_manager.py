import pytest
import torch
import torch.fx as fx
from torch import nn

from pt2pass import Pass, PassError, PassManager, PassResult


def _gm():
    return fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


class Record(Pass):
    def __init__(self, log, tag, modified=False):
        self.log, self.tag, self.modified = log, tag, modified

    @property
    def name(self):
        return f"Record[{self.tag}]"

    def call(self, gm):
        self.log.append(self.tag)
        return PassResult(gm, self.modified)


class BreakGraph(Pass):
    """Leaves a node that uses a value defined after it: lint must catch it."""

    def call(self, gm):
        nodes = list(gm.graph.nodes)
        relu = [n for n in nodes if n.op == "call_module" and n.target == "1"][0]
        out = nodes[-1]
        out.args = (relu,)
        relu.args = (out,)  # cycle / use-before-def
        return PassResult(gm, True)


class Postcondition(Pass):
    def call(self, gm):
        return PassResult(gm, False)

    def ensures(self, gm):
        raise AssertionError("postcondition X violated")


def test_passes_run_in_order_and_report_modified():
    log = []
    pm = PassManager([Record(log, "a"), Record(log, "b", modified=True), Record(log, "c")])
    gm = pm(_gm())
    assert isinstance(gm, fx.GraphModule)
    assert log == ["a", "b", "c"]
    assert [(r.name, r.modified) for r in pm.history] == [
        ("Record[a]", False), ("Record[b]", True), ("Record[c]", False)]
    assert all(r.seconds >= 0 for r in pm.history)


def test_error_names_failing_pass_and_those_before():
    log = []
    pm = PassManager([Record(log, "a"), Record(log, "b"), BreakGraph(), Record(log, "never")])
    with pytest.raises(PassError, match=r"(?s)pass BreakGraph failed: RuntimeError: .*used before it has been defined.*passes run before it: "
                                        r"\['Record\[a\]', 'Record\[b\]'\]"):
        pm(_gm())
    assert log == ["a", "b"]


def test_postcondition_failure_is_reported():
    with pytest.raises(PassError, match="pass Postcondition failed: AssertionError: postcondition X "
                                        "violated .passes run before it: none"):
        PassManager([Postcondition()])(_gm())


def test_check_can_be_disabled():
    PassManager([Postcondition()], check=False)(_gm())


def test_non_pass_rejected():
    with pytest.raises(TypeError, match="PassManager takes Pass instances"):
        PassManager([lambda gm: gm])


def test_a_generator_of_passes_runs_them_all():
    log = []
    pm = PassManager(Record(log, name) for name in "abc")  # the type check used to exhaust it
    pm(_gm())
    assert log == ["a", "b", "c"] and len(pm.history) == 3
