"""Calibration memory: the runner holds about one stage's activations at a time, reports its peak,
and can keep the per-batch values on the CPU (offload) with identical results."""
import pytest
import torch

import pt2pass
from pt2pass import CompileConfig, PassManager, SequentialTernarize, capture, store_of
from pt2pass.passes.linear_sites import quantizable_linears
from pt2pass.runner import BatchedGraphRunner, PerBatch, causal_lm_batches
from pt2pass.store import LayerQuant


def _keep_weights(fqn, W, H, config):
    """A stand-in quantizer that changes nothing (the memory pattern does not depend on it)."""
    ones = torch.ones(W.shape[0], -(-W.shape[1] // config.block_size))
    return LayerQuant(fqn, "pt2", W.sign().to(torch.int8), ones, ones * 0, None), W


def small_llama(layers=1):
    from conftest import make_tiny_llama

    return make_tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=layers)


def _batches(n=8, seqlen=32, batch_size=2):
    ids = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return causal_lm_batches(ids, batch_size)


def _peak(model, batches, **config):
    p = SequentialTernarize(batches, CompileConfig(**config), quantize_fn=_keep_weights,
                            progress=False)
    gm = PassManager([p])(capture(model))
    assert store_of(gm).config["peak_activation_bytes"] == p.peak_activation_bytes > 0
    return p.peak_activation_bytes


def _bytes(value):
    return sum(v.untyped_storage().nbytes() for v in value.values if isinstance(v, torch.Tensor))


def test_peak_activation_bytes_do_not_grow_with_depth():
    batches = _batches()
    # (the last block is lighter: nothing after its down_proj is computed; compare with 2 blocks)
    assert _peak(small_llama(layers=3), batches) == _peak(small_llama(layers=2), batches)


def test_peak_is_at_most_one_stage_of_activations(tiny_llama):
    """The reported peak is bounded by the largest stage's activations (what enters the stage plus
    everything computed in it), far below what keeping every value would hold."""
    gm = capture(tiny_llama)
    runner = BatchedGraphRunner(gm, _batches(), targets=quantizable_linears(gm, ()).values())
    per_stage, total = [], 0
    with torch.no_grad():
        for _, nodes in runner.segments():
            entering, produced = runner.live_bytes(), 0
            for node in nodes:
                value = runner.run_node(node)
                produced += _bytes(value) if isinstance(value, PerBatch) else 0
            per_stage.append(entering + produced)
            total += produced
    assert 0 < runner.peak_bytes <= max(per_stage)
    assert runner.peak_bytes < total / 2  # values are dropped after their last use


def test_stage_mode_counts_the_pinned_block_inputs():
    """sequential="stage" keeps the block's inputs for the re-run: its peak is higher, not hidden."""
    model, batches = small_llama(), _batches()
    assert _peak(model, batches, sequential="stage") > _peak(model, batches)


def test_offload_keeps_values_on_the_cpu_and_gives_identical_results(monkeypatch):
    from pt2pass import runner as runner_module

    moves = []
    real_move = runner_module._move
    monkeypatch.setattr(runner_module, "_move", lambda tree, device: moves.append(device) or
                        real_move(tree, device))
    model = small_llama()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (2, 20))
    results = {}
    for offload in (False, True):
        moves.clear()
        config = CompileConfig(seqlen=32, batch_size=2, offload_activations=offload)
        qm = pt2pass.compile(model, calib, config=config, progress=False)
        with torch.no_grad():
            results[offload] = (qm(x).logits, qm.store)
        # on CPU the offload moves are no-ops, but the code path runs: every value, both ways
        assert (len(moves) > 0) == offload
        assert qm.store.config["peak_activation_bytes"] > 0
    (y0, s0), (y1, s1) = results[False], results[True]
    assert torch.equal(y0, y1)
    for fqn in s0:
        assert torch.equal(s0[fqn].T, s1[fqn].T) and torch.equal(s0[fqn].alpha, s1[fqn].alpha)


def test_offloaded_runner_stores_on_the_offload_device_and_computes_on_the_inputs_device(tiny_llama):
    gm = capture(tiny_llama)
    target = next(iter(quantizable_linears(gm, ()).values()))
    runner = BatchedGraphRunner(gm, _batches(n=4), targets=[target], offload_to="cpu")
    assert runner.compute_device == torch.device("cpu") and runner.offload_to == torch.device("cpu")
    with torch.no_grad():
        for _, nodes in runner.segments():
            for node in nodes:
                runner.run_node(node)
    assert all(v.device.type == "cpu" for v in runner.value(target).values)


def test_offload_option_is_validated():
    with pytest.raises(ValueError, match="offload_activations=1 must be True or False"):
        CompileConfig(offload_activations=1)
