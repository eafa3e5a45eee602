"""Configuration as frozen dataclasses, validated on construction.

Errors name the field, the value given and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

ORDERS = ("ssr", "natural", "act_order")
COMPENSATIONS = ("exact", "diagonal", "none")
METHODS = ("pt2", "rtn", "gptq")
SEQUENTIAL_MODES = ("linear", "stage")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _number(name: str, value) -> None:
    # Checked before any comparison so that e.g. damp="0.01" is not a bare TypeError from "<=".
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name}={value!r} must be a real number")


def _skip_tuple(value) -> Tuple[str, ...]:
    """``skip`` as a tuple of strings. A bare string is refused: iterating it would give its
    characters, and every FQN contains "e" (from "weight"), so all Linears would be skipped."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(f"skip={value!r} must be a tuple of FQN substrings, e.g. ('lm_head',) "
                         "(a bare string is not accepted)")
    bad = [s for s in value if not isinstance(s, str) or not s]
    if bad:
        raise ValueError(f"skip={value!r}: every entry must be a non-empty string, got {bad!r}")
    return tuple(value)


@dataclass(frozen=True)
class TernaryConfig:
    """How one Linear weight is quantized (pure math settings, see pt2pass/quant)."""

    method: str = "pt2"
    """"pt2": PT²-LLM ternary (ATQ+ITF, AGA, GPTQ-style compensation); "rtn": symmetric TWN
    ternary, no calibration; "gptq": GPTQ asymmetric ``bits``-bit group-``block_size`` baseline."""
    block_size: int = 128
    """Input columns per (alpha, mu) group and per compensation block."""
    itf_max_iters: int = 20
    """Cap on ITF iterations (ITF stops earlier once T no longer changes)."""
    aga: bool = True
    """Re-fit (alpha, mu) against the calibration inputs after ITF (Activation-aware Grid Alignment)."""
    order: str = "ssr"
    """Block order: "ssr" (structural similarity, dynamic), "natural", or "act_order" (diag H)."""
    compensation: str = "exact"
    """GPTQ-style error compensation of the remaining columns: "exact" (OBS block update),
    "diagonal" (cheaper approximation), or "none" (blocks quantized independently)."""
    damp: float = 0.01
    """Hessian damping, as a fraction of mean(diag H)."""
    bits: int = 2
    """Bit width of the "gptq" baseline (ignored by the ternary methods)."""
    refine_rounds: int = 0
    """Beyond the paper (pt2pass/quant/refine.py): rounds of GPTQ-style in-block re-rounding of T
    plus grid re-fit against the compensated-loss metric after ITF + AGA. Needs
    compensation="exact"; 0 is the paper's method."""

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        _choice("order", self.order, ORDERS)
        _choice("compensation", self.compensation, COMPENSATIONS)
        _positive_int("block_size", self.block_size)
        _positive_int("itf_max_iters", self.itf_max_iters)
        _positive_int("bits", self.bits)
        if self.bits > 8:  # the baseline's codes are uint8
            raise ValueError(f"bits={self.bits!r} must be in 1..8")
        if not isinstance(self.aga, bool):  # aga="false" would be truthy
            raise ValueError(f"aga={self.aga!r} must be True or False")
        if not isinstance(self.refine_rounds, int) or self.refine_rounds < 0:
            raise ValueError(f"refine_rounds={self.refine_rounds!r} must be an integer >= 0")
        if self.refine_rounds and self.compensation != "exact":
            raise ValueError(f"refine_rounds={self.refine_rounds} needs compensation='exact', got "
                             f"{self.compensation!r}")
        _number("damp", self.damp)
        if not (0.0 <= self.damp < 1.0):
            raise ValueError(f"damp={self.damp!r} must be in [0, 1)")
        if self.block_size % 16:
            raise ValueError(f"block_size={self.block_size} must be a multiple of 16 (packing unit)")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" and (self.aga or self.compensation != "none" or
                                          self.order != "natural" or self.method == "gptq")


@dataclass(frozen=True)
class CompileConfig:
    """Settings of the whole ``pt2pass.compile`` pipeline."""

    ternary: TernaryConfig = field(default_factory=TernaryConfig)
    n_samples: Optional[int] = None
    """Calibration sequences to use (None: all that the data provides)."""
    seqlen: int = 512
    """Tokens per calibration sequence."""
    batch_size: int = 8
    """Calibration sequences run through the graph at once (does not change the result)."""
    sequential: str = "linear"
    """"linear": each Linear is quantized as soon as its inputs are known, later Linears see the
    quantized outputs (true-sequential); "stage": all Linears of a decoder block are quantized from
    full-precision block inputs, then the block is re-run with quantized weights."""
    skip: Tuple[str, ...] = ("lm_head",)
    """Weight FQN substrings kept in full precision (the LM head by default)."""
    seed: int = 0
    text_column: str = "text"
    """Field holding the text in JSON/JSONL/Parquet files and ``datasets`` objects."""
    keep_routers: bool = True
    """MoE routers (a Linear whose logits pick each token's experts, found in the graph) stay in
    full precision: a few weights per layer that decide where every token goes."""
    offload_activations: bool = False
    """Keep the per-batch calibration activations between graph nodes on the CPU and move each
    batch to the model's device only while a node computes on it: the accelerator then holds one
    batch's values instead of the whole calibration set's (slower: two copies per node and batch)."""

    def __post_init__(self):
        _choice("sequential", self.sequential, SEQUENTIAL_MODES)
        _positive_int("seqlen", self.seqlen)
        _positive_int("batch_size", self.batch_size)
        if self.n_samples is not None:
            _positive_int("n_samples", self.n_samples)
        if not isinstance(self.ternary, TernaryConfig):
            raise ValueError(f"ternary={self.ternary!r} must be a TernaryConfig")
        object.__setattr__(self, "skip", _skip_tuple(self.skip))  # frozen: normalise a list
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ValueError(f"text_column={self.text_column!r} must be a non-empty string")
        if not isinstance(self.keep_routers, bool):
            raise ValueError(f"keep_routers={self.keep_routers!r} must be True or False")
        if not isinstance(self.offload_activations, bool):
            raise ValueError(f"offload_activations={self.offload_activations!r} must be True or False")
