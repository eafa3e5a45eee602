"""The public entry points: ``compile`` and ``export``. Short functions that wire the parts."""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .assemble import lowering_passes, wrap
from .capture import capture, is_hf_causal_lm, unsupported_weight_modules, weights_outside_linears
from .config import CompileConfig, TernaryConfig
from .data import calibration_tensor
from .decode import build_decode_graph, export_decode_graph, make_skeleton
from .pass_manager import Pass, PassManager
from .passes import SequentialTernarize, TernarizeWeights
from .passes.expert_sites import classify_experts, skip_with_routers
from .passes.linear_sites import classify_linears
from .quantized_model import QuantizedModel
from .runner import causal_lm_batches
from .store import store_of

log = logging.getLogger(__name__)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError(f"{type(model).__name__} has no parameters") from None


def calibration_batches(model: nn.Module, calib_data, tokenizer, config: CompileConfig
                        ) -> List[Tuple[tuple, dict]]:
    """Turn any accepted ``calib_data`` into batches of graph inputs on the model's device."""
    device = _device_of(model)
    if is_hf_causal_lm(model):
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and config.seqlen > limit:
            log.warning("calibrating on %d-token windows, longer than the model's "
                        "max_position_embeddings (%d): positions it was never trained on",
                        config.seqlen, limit)
        ids = calibration_tensor(calib_data, tokenizer, seqlen=config.seqlen,
                                 n_samples=config.n_samples, seed=config.seed,
                                 text_column=config.text_column,
                                 vocab_size=getattr(model.config, "vocab_size", None))
        return causal_lm_batches(ids, config.batch_size, device)
    # Any other module: calib_data is a tensor of inputs (first dim = samples) or a list of them.
    if isinstance(calib_data, torch.Tensor):
        calib_data = list(calib_data.split(config.batch_size))
    if not isinstance(calib_data, (list, tuple)) or not calib_data:
        raise ValueError("calibration data for a non-LM module must be a non-empty tensor or list of "
                         "input tensors")
    for i, x in enumerate(calib_data):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration input {i} is a {type(x).__name__}, not a tensor")
        if x.device != device:
            raise ValueError(f"calibration input {i} is on {x.device} but the model is on {device}")
    return [((x,), {}) for x in calib_data]


def default_passes(batches, config: CompileConfig, progress: bool = True) -> List[Pass]:
    """The standard pipeline: sequential calibration + ternarization, SSR permutations made explicit
    and folded into producers where legal, then lowering (remaining private gathers fuse into the op)."""
    if config.ternary.needs_calibration:
        quantize: Pass = SequentialTernarize(batches, config, progress=progress)
    else:
        quantize = TernarizeWeights(config, progress=progress)
    return [quantize, *lowering_passes()]


def compile(model: nn.Module, calib_data=None, tokenizer=None, config: Optional[CompileConfig] = None,
            *, example_inputs=None, passes: Optional[Sequence[Pass]] = None,
            progress: bool = True) -> QuantizedModel:
    """Ternarize ``model`` with PT²-LLM and lower its Linears to ``pt2pass::ternary_linear``.

    ``calib_data``: token tensor (n, seqlen), list of token tensors, list of strings (with
    ``tokenizer``), a local text/JSON/parquet file or folder, or a ``datasets.Dataset``; for a
    module that is not an HF causal LM, a tensor of inputs (first dim = samples) or a list of
    input tensors. ``example_inputs``: what to trace the model with; by default random ids for a
    causal LM and the first calibration batch for any other module. The model itself is not
    modified. Returns a :class:`QuantizedModel` called like the model.
    """
    check_compile_args(tokenizer, config)
    config = config or CompileConfig()
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers: nothing to ternarize"
                         + _unsupported_hint(model))
    check_finite_weights(model, config.skip)
    was_training = model.training
    model.eval()
    try:
        batches = []
        if calib_data is not None:
            batches = calibration_batches(model, calib_data, tokenizer, config)
        elif config.ternary.needs_calibration:
            raise ValueError(f"method {config.ternary.method!r} needs calibration data (calib_data)")
        if example_inputs is None and batches and not is_hf_causal_lm(model):
            example_inputs = _example_from_calibration(batches)
        gm = capture(model, example_inputs)
        if passes is None:
            check_quantizable(model, gm, config)
        store = store_of(gm)
        store.config.update({"ternary": vars(config.ternary), "seqlen": config.seqlen,
                             "n_calibration_sequences": sum(_rows(b) for b in batches)})
        manager = PassManager(list(passes) if passes is not None
                              else default_passes(batches, config, progress))
        gm = manager(gm)
    finally:
        model.train(was_training)
    # Decode graphs are captured later from a skeleton sharing the model's other tensors but
    # holding no copy of the quantized weights (meta), so the FP Linears can be freed.
    skeleton = make_skeleton(model, store) if is_hf_causal_lm(model) else model
    return wrap(gm, store, skeleton, pass_history=manager.history)


def _widened(x, dims: Sequence[int]):
    """``x`` repeated twice along each of ``dims`` where it has size 1: torch.export fixes a dim of
    size 1 to 1 (0/1 specialization), so an example of one row (or one token) would give a program
    that refuses any other size. Examples only trace: repeated values do."""
    if not isinstance(x, torch.Tensor):
        return x
    reps = [2 if d in dims and size == 1 else 1 for d, size in enumerate(x.shape)]
    return x.repeat(*reps) if 2 in reps else x


def _example_from_calibration(batches) -> tuple:
    """A generic module's tracing inputs: its first calibration batch, which has the shapes the
    module takes, with a batch of one row doubled."""
    return tuple(_widened(x, (0,)) for x in batches[0][0])


def check_compile_args(tokenizer, config) -> None:
    """Refuse a configuration in the tokenizer's place (``compile(model, data, CompileConfig(...))``:
    with token ids the tokenizer is never called, so the defaults would run unnoticed) and a
    config of another type."""
    if isinstance(tokenizer, (CompileConfig, TernaryConfig, dict)):
        raise TypeError(f"compile's third argument is the tokenizer, got a {type(tokenizer).__name__}: "
                        "pass the configuration by name, config=CompileConfig(...)")
    if config is not None and not isinstance(config, CompileConfig):
        hint = " (a TernaryConfig goes inside it: CompileConfig(ternary=...))" \
            if isinstance(config, TernaryConfig) else ""
        raise TypeError(f"config must be a pt2pass.CompileConfig, got {type(config).__name__}{hint}")


def check_finite_weights(model: nn.Module, skip: Sequence[str] = ()) -> None:
    """Refuse NaN/Inf in the weight of a Linear that would be quantized, before any work, naming it."""
    for name, module in model.named_modules():
        fqn = f"{name}.weight" if name else "weight"
        if not isinstance(module, nn.Linear) or any(s in fqn for s in skip):
            continue
        w = module.weight
        if w.device.type == "meta":
            continue
        bad = ~torch.isfinite(w)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{fqn} contains {int(bad.sum())} NaN/Inf value(s) (the first at "
                             f"[{row}, {col}]): the model's weights are corrupt, nothing was "
                             "quantized")


def check_quantizable(model: nn.Module, gm, config: CompileConfig) -> None:
    """At least one Linear of the captured graph must be quantizable; otherwise say why each one
    is left out and which weight-holding modules pt2pass does not support."""
    skip = skip_with_routers(gm, config)  # the passes leave the MoE routers out alike
    if len(skip) > len(config.skip):
        log.info("%d MoE router(s) kept in full precision (CompileConfig.keep_routers), e.g. %s",
                 len(skip) - len(config.skip), skip[len(config.skip)])
    sites, excluded = classify_linears(gm, skip)
    expert_sites, expert_excluded = classify_experts(gm, skip)
    fqns = list(sites) + list(excluded)
    default = CompileConfig().skip  # "lm_head" is the default for any model: no warning
    tagged = fqns + list(expert_sites) + list(expert_excluded)
    for unused in [s for s in config.skip if s not in default and not any(s in f for f in tagged)]:
        log.warning("skip entry %r matches no Linear or experts weight (e.g. %s): nothing is kept in "
                    "full precision by it", unused, tagged[0] if tagged else "none")
    read = _read_by_graph(model, fqns)
    bypassing = _linears_not_in_graph(model, read)
    if sites or expert_sites:
        _warn_weights_outside_linears(model, read | _read_by_graph(model, [*expert_sites, *expert_excluded]))
        if bypassing:
            log.warning("%s: they stay in full precision", bypassing)
        return
    found = "; ".join(f"{fqn} {reason}" for fqn, reason in {**excluded, **expert_excluded}.items()) or "none"
    raise ValueError(f"{type(model).__name__}: no Linear layer can be ternarized (Linear weights "
                     f"in the graph: {found}){'. ' + bypassing if bypassing else ''}"
                     f"{_unsupported_hint(model)}")


def _read_by_graph(model: nn.Module, graph_fqns: Sequence[str]) -> set:
    """ids of the parameters the graph's aten.linear nodes read (a tied weight under either name)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {id(params[f]) for f in graph_fqns if f in params}


def _linears_not_in_graph(model: nn.Module, read: set) -> str:
    """A sentence naming the nn.Linear modules whose weight no aten.linear of the graph reads
    (``read``: ids, see _read_by_graph; e.g. Falcon's FalconLinear, whose forward does its own
    matmul); "" when there are none."""
    missing = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m.weight) not in read]
    if not missing:
        return ""
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"{len(missing)} nn.Linear module(s) never run as aten.linear, e.g. {shown}: their forward "
            "does its own matmul, which pt2pass does not ternarize")


def _warn_weights_outside_linears(model: nn.Module, read: set) -> None:
    """A model quantized only in part (e.g. MoE experts in a form pt2pass does not rewrite) must
    say so: its size and speed-up are far from what the Linears alone suggest. Weights that the
    graph reads through aten.linear (``read``; F.linear on a module's own parameter) and the
    stacked experts it ternarizes count as Linears."""
    params = dict(model.named_parameters(remove_duplicate=False))
    others = [(fqn, n) for fqn, n in weights_outside_linears(model) if id(params.get(fqn)) not in read]
    if not others:
        return
    total = sum(p.numel() for p in model.parameters())
    kept = sum(n for _, n in others)
    largest = sorted(others, key=lambda item: -item[1])[:3]
    log.warning("%d weight tensor(s) outside nn.Linear stay in full precision: %.1f%% of the parameters "
                "(e.g. %s); pt2pass ternarizes nn.Linear (aten.linear) and MoE experts run as grouped "
                "matmuls of (experts, out, in) weights only", len(others),
                100.0 * kept / max(total, 1), ", ".join(f"{fqn} {n:,}" for fqn, n in largest))


def _unsupported_hint(model: nn.Module) -> str:
    others = unsupported_weight_modules(model)
    if not others:
        return ""
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f". {len(others)} module(s) hold a 2-D weight but are not nn.Linear, e.g. {shown}: "
            "pt2pass ternarizes nn.Linear (aten.linear) only; convert them to nn.Linear first")


def _rows(batch) -> int:
    args, kwargs = batch
    x = kwargs.get("input_ids", args[0] if args else None)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 0


def export(qm: QuantizedModel, example_inputs=None, *, graph: str = "full", batch_size: int = 1,
           max_cache_len: Optional[int] = None, padded: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` the compiled model.

    ``graph="full"``: the model's forward, ``program.module()(input_ids).logits`` (dynamic batch
    and sequence length for causal LMs). ``graph="decode"`` (causal LMs): the static-KV-cache
    step, ``(input_ids (batch_size, S), cache_position (S,)) -> logits (batch_size, 1, vocab)`` of
    the last position, S in [1, max_cache_len]: the prompt at positions 0..S-1, then one token per
    call. The cache is the program's buffers (``pt2pass_kv_*``), written in place; generate with
    ``pt2pass.decode.generate_with_program``. ``max_cache_len`` (prompt + new tokens) is required.
    ``padded=True``: the step also takes ``attention_mask`` (batch_size, max_cache_len) and
    ``position_ids`` (batch_size, S), for left-padded prompts (``generate_with_program(...,
    attention_mask=)`` fills them in).
    """
    if graph == "decode":
        return _export_decode(qm, example_inputs, batch_size, max_cache_len, padded)
    if graph != "full":
        raise ValueError(f"graph={graph!r} is not supported; allowed: 'full', 'decode'")
    if batch_size != 1 or max_cache_len is not None or padded:  # the full graph's batch is dynamic
        raise ValueError('batch_size, max_cache_len and padded apply to graph="decode"; graph="full" '
                         "takes example_inputs")
    if example_inputs is None:
        if not qm.causal_lm:
            raise ValueError("example_inputs are required to export a non-LM module")
        example_inputs = (torch.zeros(2, 16, dtype=torch.long, device=_device_of(qm)),)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if qm.causal_lm and len(example_inputs) == 1:
        example_inputs = (_widened(example_inputs[0], (0, 1)),)  # (batch, sequence)
    dims = tuple({d: torch.export.Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor)
                 else None for x in example_inputs)
    if not qm.causal_lm:
        ones = [(i, d) for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)
                for d, size in enumerate(x.shape) if size == 1]
        if ones:
            log.warning("export: example input %d has size 1 in dim %d; torch.export fixes such dims "
                        "to 1 in the program (give an example with >= 2 there to keep it dynamic)", *ones[0])
        dims = (dims,)  # QuantizedModel.forward(*args): the inputs are one varargs parameter
    with torch.no_grad():
        return torch.export.export(qm, example_inputs, dynamic_shapes=dims, strict=False)



def _export_decode(qm: QuantizedModel, example_inputs, batch_size: int,
                   max_cache_len: Optional[int], padded: bool) -> torch.export.ExportedProgram:
    if not qm.causal_lm:
        raise ValueError('graph="decode" needs a causal LM (a QuantizedCausalLM)')
    if example_inputs is not None:
        raise ValueError('graph="decode" takes batch_size and max_cache_len, not example_inputs')
    if max_cache_len is None:
        raise ValueError('graph="decode" needs max_cache_len (prompt + new tokens to hold)')
    for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    limit = qm.max_positions
    if limit is not None and max_cache_len > limit:
        raise ValueError(f"max_cache_len={max_cache_len} exceeds the model's "
                         f"max_position_embeddings ({limit})")
    if qm.skeleton is None:
        raise ValueError("this QuantizedCausalLM has no skeleton model to capture a decode graph "
                         "from (pass skeleton= when constructing it)")
    # A graph of its own (not the one generate uses), so the program starts from an empty cache.
    gm = build_decode_graph(qm.skeleton, qm.store, batch_size, max_cache_len, share_with=qm.gm,
                            padded=padded)
    return export_decode_graph(gm)
