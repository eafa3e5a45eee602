"""common.LATENCY: the small-M GEMVs' L2 prefetch and programmatic dependent launch. Whether they
pay off is measured on the GPU (benchmarks/experiments/sweep_latency.py, which also checks them bit
for bit against the plain launch); the sm_90 builds are checked by test_sm90_build.py. Here: when
the launchers may ask Triton for a dependent launch at all."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pt2pass.lowering.kernels import common
from pt2pass.lowering.kernels.common import LATENCY, latency_meta


@pytest.fixture
def pdl_on(monkeypatch):
    monkeypatch.setitem(LATENCY, "pdl", True)
    monkeypatch.setitem(LATENCY, "prefetch_blocks", 32)


def test_no_prefetch_in_the_interpreter(pdl_on):
    # the interpreter has no inline PTX: the prefetch is compiled out there
    assert latency_meta(torch.zeros(1, 256, dtype=torch.bfloat16)) == {"PREFETCH": 0, "PDL": False}


def test_no_dependent_launch_for_cpu_tensors_or_while_traced(pdl_on, monkeypatch):
    # as on a GPU machine (the interpreter alone would turn it off): CPU tensors never ask for it,
    # and neither do torch.compile / export, which trace the launch with fake tensors into a graph
    # whose launcher takes no launch_pdl option (passing it there would fail the trace)
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "hopper_or_newer", lambda device: True)
    assert latency_meta(torch.zeros(1, 256, dtype=torch.bfloat16)) == {"PREFETCH": 32, "PDL": False}
    with FakeTensorMode():
        x = torch.empty(1, 256, dtype=torch.bfloat16, device="cuda")
        meta = latency_meta(x)
    assert meta == {"PREFETCH": 32, "PDL": False}
