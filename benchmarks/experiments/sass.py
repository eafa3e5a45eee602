"""Offline sm_90 build of a Triton kernel (no GPU needed): registers, SASS instruction count, and
how many of chosen opcodes it has. Every new kernel goes through this before it reaches the lent
GPU (the interpreter accepts code that the compiler rejects) and it is how the docs' "N SASS
instructions" figures were measured.

    from benchmarks.experiments.sass import sass_report
    sass_report(kernel, {"x_ptr": "*i32", "N": "i32", ...}, {"BN": 8, ...}, num_warps=2)

    python3 benchmarks/experiments/sass.py [--quick]   # the decode kernels and the GEMM, every config

Arguments not named in ``types`` or ``constexprs`` default to "i32"; pointers must be given;
"i32/16" marks an integer that launches pass divisible by 16.
Uses the ptxas / cuobjdump that Triton bundles. Not under TRITON_INTERPRET=1 (the interpreter
replaces the kernels with Python functions): tests/lowering/test_sm90_build.py runs ``--quick``
in a subprocess.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _unwrap(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):  # autotuner / heuristics wrappers
        kernel = kernel.fn
    return kernel


def build(kernel, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 1):
    """The compiled kernel (sm_90) for the given argument types and constexpr values."""
    fn = _unwrap(kernel)
    sig = {name: ("constexpr" if name in constexprs else types.get(name, "i32").split("/")[0]) for name in fn.arg_names}
    # as at a launch with tensors from torch's allocator: every pointer 16-byte aligned; integers
    # typed "i32/16" divisible by 16, as Triton specializes them at a launch (e.g. row strides)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or types.get(name, "").endswith("/16")}
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def lane_per_element(ttgir: str, num_warps: int) -> bool:
    """Whether every inline-asm op of a (R, 32 warps) kernel works on tensors laid out one element
    per thread, element (r, 32 w + lane) in lane ``lane`` of warp w: what gemv_imma's MMA fragments
    rely on (the compiler may pick other layouts for elementwise ops). A slice of a 3-D layout along
    its last dimension (what a pick out of a vector load gives) counts by its two other dimensions."""
    blocked = {name: {k: [int(v) for v in vals.split(",")] for k, vals in
                      re.findall(r"(\w+) = \[([\d, ]+)\]", body)}
               for name, body in re.findall(r"^(#blocked\d*) = #ttg\.blocked<\{(.*)\}>", ttgir, flags=re.M)}
    want = {"sizePerThread": [1, 1], "threadsPerWarp": [1, 32], "warpsPerCTA": [1, num_warps]}

    def fits(layout: str) -> bool:
        sliced = re.fullmatch(r"#ttg\.slice<\{dim = (\d+), parent = (#blocked\d*)\}>", layout)
        dim, name = (int(sliced.group(1)), sliced.group(2)) if sliced else (None, layout)
        if name not in blocked:
            return False
        kept = {k: [v for i, v in enumerate(blocked[name][k]) if i != dim] for k in want}
        return kept == want and (dim is None or dim == len(blocked[name]["order"]) - 1)

    # the L2 prefetches and grid-dependency waits (common.LATENCY) are asm on other tensors, not MMAs
    asm = [line for line in ttgir.splitlines() if "elementwise_inline_asm" in line
           and "prefetch.global" not in line and "griddepcontrol" not in line]
    layouts = [lay for line in asm for lay in re.findall(r"tensor<[^,]+, (#ttg\.slice<\{[^}]*\}>|#blocked\d*)>", line)]
    return bool(asm) and bool(layouts) and all(fits(lay) for lay in layouts)


def sass_report(kernel, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 1,
                opcodes=("LDG", "LDGSTS", "UTMALDG", "LDS", "STS", "IDP", "IMMA", "HGMMA", "LDL", "STL")) -> dict:
    """{"regs", "instructions", opcode: count, "sass": text, "lane_per_element": bool} of the
    sm_90 build."""
    compiled = build(kernel, types, constexprs, num_warps, num_stages)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        def dump(flag):
            return subprocess.run([os.path.join(_BIN, "cuobjdump"), flag, path], check=True,
                                  capture_output=True, text=True).stdout
        sass, usage = dump("-sass"), dump("-res-usage")
    finally:
        os.unlink(path)
    ops = Counter()
    n = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            n += 1
            ops[m.group(1).split(".")[0]] += 1
    report = {"regs": int(re.search(r"REG:(\d+)", usage).group(1)), "instructions": n, "sass": sass,
              "lane_per_element": lane_per_element(compiled.asm["ttgir"], num_warps)}
    for op in opcodes:
        report[op] = ops.get(op, 0)
    return report


_DP2A_TYPES = {"xp_ptr": "*i32", "xint_ptr": "*i32", "w_ptr": "*i32", "xscale_ptr": "*fp32", "xs_ptr": "*fp32",
               "a_ptr": "*bf16", "mu_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
_GROUP_TYPES = {**{f"w{i}": "*i32" for i in range(3)}, **{f"{n}{i}": "*bf16" for n in ("a", "mu", "bias", "out")
                                                           for i in range(3)},
                "xp_ptr": "*i32", "xint_ptr": "*i32", "xscale_ptr": "*fp32", "xs_ptr": "*fp32", "ss_ptr": "*fp32",
                "eps": "fp64"}  # a Python float as Inductor types it
_QUANT_TYPES = {"x_ptr": "*bf16", "perm_ptr": "*i64", "xp_ptr": "*i32", "xint_ptr": "*i32", "xscale_ptr": "*fp32",
                "xs_ptr": "*fp32", **{f"perm{i}": "*i64" for i in range(3)}}


_IMMA_TYPES = {"xf_ptr": "*i32", "xstat_ptr": "*fp32", "w_ptr": "*i64",
               "a_ptr": "*bf16", "mu_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}


def decode_kernel_builds(quick: bool):
    """(name, kernel, types, constexprs, num_warps) of the decode kernels: the dp2a GEMV and the
    grouped one with every autotune config (``quick``: the first plain and the first TMA one), the
    integer-MMA GEMV with every config for one and two x tiles (``quick``: the first), the decode
    attention kernels, and the x quantizers."""
    from pt2pass.lowering.kernels import decode_attention, gemv_dp2a, gemv_group, gemv_imma, norm_group
    from pt2pass.lowering.kernels.common import PREPACK

    configs = gemv_dp2a.dp2a_configs(tma=True)
    if quick:
        configs = [configs[0], configs[len(gemv_dp2a.DP2A_SHAPES)]]
    builds = []
    for c in configs:
        kw = dict(c.kwargs, USE_ASM=True)
        tag = f"BN={kw['BN']} NBT={kw['NBT']} warps={c.num_warps} STAGES={kw['STAGES']} TMA={kw['USE_TMA']}"
        builds.append(("ternary_gemv_dp2a_kernel " + tag, gemv_dp2a.ternary_gemv_dp2a_kernel, _DP2A_TYPES,
                       dict(kw, HAS_BIAS=True, SPLIT_OUT=False, PREFETCH=0, PDL=False), c.num_warps))
        for norm in (False, True):  # NORM: the add + RMSNorm fused into the quantize launch (norm_group.py)
            builds.append((f"ternary_gemv_group_kernel {tag} NORM={norm}", gemv_group.ternary_gemv_group_kernel,
                           _GROUP_TYPES, dict(kw, X_PER_MEMBER=1, HAS_BIAS=True, NORM=norm, NB_P2=32, PREFETCH=0),
                           c.num_warps))
    imma = gemv_imma.IMMA_SHAPES if not quick else gemv_imma.IMMA_SHAPES[:1]
    for tiles in (1, 2):
        for r, w, nbt in imma:
            builds.append((f"ternary_gemv_imma_kernel R={r} WARPS={w} NBT={nbt} TILES={tiles}",
                           gemv_imma.ternary_gemv_imma_kernel, _IMMA_TYPES,
                           dict(R=r, WARPS=w, NBT=nbt, TILES=tiles, USE_ASM=True, HAS_BIAS=True, SPLIT_OUT=False,
                                ALIGNED=True, STREAM_CG=False, PREFETCH=0, PDL=False), w))
    builds.append(("_quantize_x_imma_kernel", gemv_imma._quantize_x_imma_kernel,
                   {**_QUANT_TYPES, "xf_ptr": "*i32", "xstat_ptr": "*fp32"},
                   dict(HAS_PERM=True, NBT=PREPACK["NBT"], PDL=False), PREPACK["num_warps"]))
    builds.append(("_quantize_x_kernel", gemv_dp2a._quantize_x_kernel, _QUANT_TYPES,
                   dict(HAS_PERM=True, NBT=PREPACK["NBT"], PDL=False), PREPACK["num_warps"]))
    # decode attention at the 7B shape (head dim 128, bool and additive masks); the strides of q
    # and the cache are multiples of 16 there, the mask's slot stride is 1
    attn_types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i1", "acc_ptr": "*fp32",
                  "ml_ptr": "*fp32", "out_ptr": "*bf16", "scale": "fp64",
                  **{f"s{t}_{d}": "i32/16" for t in "qkv" for d in "bhl"}, "so_b": "i32/16", "so_h": "i32/16"}
    for kind, mask_type in ((decode_attention.BOOL_MASK, "*i1"), (decode_attention.ADD_MASK, "*bf16")):
        for warps in (4, 2):  # the launcher's two choices
            builds.append((f"decode_attention._decode_attention_split_kernel MASK={kind.value} warps={warps}",
                           decode_attention._decode_attention_split_kernel, {**attn_types, "mask_ptr": mask_type},
                           dict(MASK=kind.value, D=128, BL=decode_attention.BLOCK_L, sm_l=1), warps))
    builds.append(("decode_attention._decode_attention_combine_kernel",
                   decode_attention._decode_attention_combine_kernel, attn_types,
                   dict(D=128, NS=decode_attention.MAX_SPLITS), 4))
    builds.append(("_quantize_x_group_kernel", gemv_group._quantize_x_group_kernel, _QUANT_TYPES,
                   dict(NBT=PREPACK["NBT"]), PREPACK["num_warps"]))
    builds.append(("_add_norm_quantize_kernel", norm_group._add_norm_quantize_kernel,
                   {**_QUANT_TYPES, "a_ptr": "*bf16", "b_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16",
                    "ss_ptr": "*fp32"}, dict(HAS_PERM=True, NBT=PREPACK["NBT"]), PREPACK["num_warps"]))
    return builds


_GEMM_TYPES = {"x_ptr": "*bf16", "w_ptr": "*i32", "a_ptr": "*bf16", "mu_ptr": "*bf16", "bias_ptr": "*bf16",
               "perm_ptr": "*i64", "out_ptr": "*bf16", "KW": "i32/16", "stride_xm": "i32/16"}


def gemm_kernel_builds(quick: bool):
    """(name, kernel, types, constexprs, num_warps, num_stages) of the fused GEMM with every autotune
    config (``quick``: the first swapped one of each list)."""
    from pt2pass.lowering.kernels import gemm

    configs = gemm._SMALL_M + gemm._LARGE_M
    if quick:
        configs = [next(c for c in lst if c.kwargs["SWAP"]) for lst in (gemm._SMALL_M, gemm._LARGE_M)]
    return [(f"ternary_gemm_kernel " + " ".join(f"{k}={v}" for k, v in c.kwargs.items() if k != "GROUP_M")
             + f" warps={c.num_warps} stages={c.num_stages}", gemm.ternary_gemm_kernel, _GEMM_TYPES,
             dict(c.kwargs, HAS_BIAS=True, HAS_PERM=False, SPLIT_OUT=False, DOT_F32=False), c.num_warps,
             c.num_stages) for c in configs]


_EXPERTS_TYPES = {"x_ptr": "*bf16", "w_ptr": "*i32", "a_ptr": "*fp16", "mu_ptr": "*fp16", "perm_ptr": "*i32",
                  "out_ptr": "*bf16", "tile_expert_ptr": "*i32", "tile_row_ptr": "*i64", "tile_end_ptr": "*i64",
                  "K": "i32/16", "KW": "i32/16"}


def experts_kernel_builds(quick: bool):
    """The grouped MoE experts GEMM at the launcher's two row tiles (16: decode, 64: prefill), with
    every autotune config (``quick``: the fixed one)."""
    from pt2pass.lowering.kernels import experts

    return [(f"ternary_experts_kernel BM={bm} BN={bn} HAS_PERM=True warps={w} stages={st}",
             experts.ternary_experts_kernel, _EXPERTS_TYPES, dict(HAS_PERM=True, DOT_F32=False, BM=bm, BN=bn), w, st)
            for bm, configs in experts.CONFIGS.items() for bn, w, st in ([(64, 4, 3)] if quick else configs)]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="offline sm_90 builds of the decode kernels and the GEMM")
    parser.add_argument("--quick", action="store_true", help="one plain and one TMA config only (GEMM: one swapped config per list)")
    args = parser.parse_args(argv)
    bad = 0
    print("| kernel | registers | SASS instructions | TMA loads | integer MMAs | local-memory (spill) loads / stores "
          "| wgmma | shared-memory stores |")
    print("|---|---|---|---|---|---|---|---|")
    builds = ([(*b, 1) for b in decode_kernel_builds(args.quick)] + gemm_kernel_builds(args.quick)
              + experts_kernel_builds(args.quick))
    for name, kernel, types, constexprs, warps, stages in builds:
        r = sass_report(kernel, types, constexprs, num_warps=warps, num_stages=stages)
        # a TMA config must issue bulk tensor copies; no config may spill to local memory; the
        # integer-MMA GEMV must issue IMMA on one-element-per-lane tensors; the GEMM must use wgmma
        # where its tile allows (x rows >= 64, or swapped: weight rows >= 64) and, swapped, must not
        # store the weight tile to shared memory (the point of swapping; a few STS stay in the epilogue)
        mma = name.startswith("ternary_gemv_imma")
        wrong = (r["LDL"] + r["STL"] > 0 or (constexprs.get("USE_TMA") is True) != (r["UTMALDG"] > 0)
                 or mma != (r["IMMA"] > 0) or (mma and not r["lane_per_element"]))
        if name.startswith("ternary_experts"):  # unswapped: wgmma from 64 rows of x
            wrong |= (constexprs["BM"] >= 64) != (r["HGMMA"] > 0)
        if name.startswith("ternary_gemm"):
            swap = constexprs["SWAP"]
            wgmma = (constexprs["BN"] if swap else constexprs["BM"]) >= 64
            wrong |= wgmma != (r["HGMMA"] > 0) or (swap and r["STS"] > 4)
        bad += wrong
        print(f"| {name} | {r['regs']} | {r['instructions']} | {r['UTMALDG']} | {r['IMMA']} | {r['LDL']} / {r['STL']} "
              f"| {r['HGMMA']} | {r['STS']} |"
              + (" WRONG" if wrong else ""), flush=True)
    bad += latency_builds()
    print(f"{bad} wrong builds")
    return 1 if bad else 0


def latency_builds() -> int:
    """common.LATENCY's code in the sm_90 builds: with PREFETCH the GEMVs issue L2 prefetches
    (CCTL.E.PF2), with PDL one grid-dependency wait (ACQBULK) after every prefetch (else the
    prefetch would not overlap the quantize launch) and before every global write (but a TMA
    config's descriptor), and the x quantizers the early launch of their dependents (PREEXIT);
    without them none of these. Returns the number of wrong builds."""
    from pt2pass.lowering.kernels import gemv_dp2a, gemv_half2, gemv_imma
    from pt2pass.lowering.kernels.common import PREPACK

    half2_types = {**_DP2A_TYPES, "x_ptr": "*bf16", "perm_ptr": "*i64"}
    imma = dict(R=1, WARPS=4, NBT=4, TILES=1, USE_ASM=True, HAS_BIAS=True, SPLIT_OUT=False, ALIGNED=True,
                STREAM_CG=False)
    dp2a = dict(BN=16, NBT=8, STAGES=3, USE_TMA=True, USE_ASM=True, HAS_BIAS=True, SPLIT_OUT=False)
    quant = dict(HAS_PERM=True, NBT=PREPACK["NBT"])
    builds = [("ternary_gemv_half2_kernel", gemv_half2.ternary_gemv_half2_kernel, half2_types,
               dict(BN=8, NBT=32, USE_ASM=True, HAS_BIAS=True, HAS_PERM=False, SPLIT_OUT=False, PREFETCH=pf), 2)
              for pf in (0, 32)]
    for pf, pdl in ((0, False), (32, True)):
        builds += [("ternary_gemv_dp2a_kernel", gemv_dp2a.ternary_gemv_dp2a_kernel, _DP2A_TYPES,
                    dict(dp2a, PREFETCH=pf, PDL=pdl), 2),
                   ("ternary_gemv_dp2a_kernel", gemv_dp2a.ternary_gemv_dp2a_kernel, _DP2A_TYPES,
                    dict(dp2a, STAGES=1, USE_TMA=False, PREFETCH=pf, PDL=pdl), 2),
                   ("ternary_gemv_imma_kernel", gemv_imma.ternary_gemv_imma_kernel, _IMMA_TYPES,
                    dict(imma, PREFETCH=max(gemv_imma.IMMA_PREFETCH) if pf else 0, PDL=pdl), 4),
                   ("_quantize_x_kernel", gemv_dp2a._quantize_x_kernel, _QUANT_TYPES, dict(quant, PDL=pdl), 1),
                   ("_quantize_x_imma_kernel", gemv_imma._quantize_x_imma_kernel,
                    {**_QUANT_TYPES, "xf_ptr": "*i32", "xstat_ptr": "*fp32"}, dict(quant, PDL=pdl), 1)]
    bad = 0
    for name, kernel, types, constexprs, warps in builds:
        sass = sass_report(kernel, types, constexprs, num_warps=warps)["sass"].splitlines()
        at = {op: [i for i, line in enumerate(sass) if re.search(rf"\b{op}\b", line)]
              for op in ("CCTL.E.PF2", "ACQBULK", "PREEXIT")}
        # global writes before the wait: none, but a TMA config's descriptor into its own scratch
        early = [line for line in sass[:at["ACQBULK"][0]] if re.search(r"\b(STG|ATOMG|RED|ST)\.", line)
                 and not (constexprs.get("USE_TMA") and "ATOMG.E.EXCH" in line)] if at["ACQBULK"] else []
        pf, pdl = constexprs.get("PREFETCH", 0), constexprs.get("PDL", False)
        if name.startswith("_quantize"):
            wrong = bool(at["PREEXIT"]) != pdl or bool(at["CCTL.E.PF2"] or at["ACQBULK"])
        else:
            wrong = (bool(at["CCTL.E.PF2"]) != (pf > 0) or len(at["ACQBULK"]) != int(pdl) or bool(at["PREEXIT"])
                     or (pdl and pf > 0 and max(at["CCTL.E.PF2"]) > at["ACQBULK"][0]) or bool(early))
        bad += wrong
        tma = f" TMA={constexprs['USE_TMA']}" if "USE_TMA" in constexprs else ""
        print(f"latency build: {name}{tma} PREFETCH={pf} PDL={pdl}: {len(at['CCTL.E.PF2'])} L2 prefetches, "
              f"{len(at['ACQBULK'])} waits, {len(at['PREEXIT'])} early launches" + (" WRONG" if wrong else ""),
              flush=True)
    return bad


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    raise SystemExit(main())
