import pytest
import torch

from pt2pass.capture import capture, linear_nodes
from pt2pass.runner import BatchedGraphRunner, PerBatch, causal_lm_batches


def test_runner_reproduces_each_batch_exactly(tiny_llama):
    gm = capture(tiny_llama)
    ids = torch.randint(0, 256, (6, 12))
    batches = causal_lm_batches(ids, batch_size=4)
    assert [b[1]["input_ids"].shape[0] for b in batches] == [4, 2]
    out_node = [n for n in gm.graph.nodes if n.op == "output"][0]
    logits_node = out_node.args[0][0]
    runner = BatchedGraphRunner(gm, batches, targets=[logits_node])
    with torch.no_grad():
        for _, nodes in runner.segments():
            for node in nodes:
                runner.run_node(node)
        got = runner.value(logits_node)
        assert isinstance(got, PerBatch) and len(got.values) == 2
        want = tiny_llama(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(got.values), want, rtol=1e-6, atol=1e-6)


def test_runner_skips_nodes_not_needed_and_frees_values(tiny_llama):
    gm = capture(tiny_llama)
    first = linear_nodes(gm)["model.layers.0.self_attn.q_proj.weight"]
    runner = BatchedGraphRunner(gm, causal_lm_batches(torch.randint(0, 256, (2, 8)), 2), [first])
    assert all(n.name != "linear_14" for n in runner.nodes)  # lm_head never runs
    with torch.no_grad():
        for _, nodes in runner.segments():
            for node in nodes:
                runner.run_node(node)
    # only the target's own value is still held
    assert list(runner.env) == [first]


def test_calibration_runs_in_place_writes_into_a_buffer_a_linear_reads():
    # y = new_empty(); y[..., :16] = a(x); y[..., 16:] = b(x); c(y) (DeepSeek-V2's attention
    # builds q this way): the copy_ nodes are no data ancestors of c, were skipped, and c was
    # calibrated on uninitialised memory (H of inf or ~1e38)
    from pt2pass import CaptureCalibration, PassManager, capture, store_of

    class Writes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(32, 16), torch.nn.Linear(32, 16),
                                      torch.nn.Linear(32, 32))

        def forward(self, x):
            y = x.new_empty(*x.shape[:-1], 32)
            y[..., :16] = self.a(x)
            y[..., 16:] = self.b(x)
            return self.c(y)

    torch.manual_seed(0)
    m, xs = Writes().eval(), torch.randn(8, 4, 32)
    gm = capture(m, (xs[:2],))
    assert sum(n.target is torch.ops.aten.copy_.default for n in gm.graph.nodes) == 2
    batches = [((xs[i:i + 2],), {}) for i in range(0, 8, 2)]
    gm = PassManager([CaptureCalibration(batches, skip=(), progress=False)])(gm)
    with torch.no_grad():
        y = torch.cat([m.a(xs), m.b(xs)], -1).reshape(-1, 32)
    torch.testing.assert_close(store_of(gm).config["hessians"]["c.weight"], 2 / y.shape[0] * y.T @ y,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids, kwargs, match", [
    (torch.randint(0, 256, (64,)), {}, r"must be a 2-D \(n, seqlen\) tensor, got \(64,\)"),
    (torch.rand(2, 8), {}, r"token ids must be integers"),
    (torch.full((2, 8), -3), {}, r"calibration ids contain a negative id \(-3\)"),
    (torch.full((2, 8), 300), {"vocab_size": 256}, r"calibration ids contain id 300 >= vocab_size=256"),
    (torch.zeros(2, 8, dtype=torch.long), {"batch_size": 0}, r"batch_size=0 must be a positive integer"),
])
def test_causal_lm_batches_names_bad_ids(ids, kwargs, match):
    # these surfaced as an IndexError inside the first pass that ran the graph
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        causal_lm_batches(ids, **kwargs)
