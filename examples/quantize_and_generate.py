"""Ternarize the embedded SmolLM2-135M on Shakespeare and generate from it (CPU, ~3 minutes).

    python examples/quantize_and_generate.py                     # 16 calibration windows x 512 tokens
    python examples/quantize_and_generate.py --n-samples 4 --seqlen 128   # quicker, rougher
"""
import argparse

import torch

import pt2pass
from pt2pass.data import DEFAULT_CALIB_PLAYS
from pt2pass.models import load_smollm2, shakespeare_files

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n-samples", type=int, default=16, help="calibration windows (default 16)")
parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
args = parser.parse_args()

model, tok = load_smollm2()
config = pt2pass.CompileConfig(n_samples=args.n_samples, seqlen=args.seqlen)
qm = pt2pass.compile(model, shakespeare_files(DEFAULT_CALIB_PLAYS), tok, config)

prompt = tok("KING HENRY: Once more unto the breach,", return_tensors="pt").input_ids
with torch.no_grad():
    out = qm.generate(prompt, max_new_tokens=20)
print(tok.decode(out[0]))
worst = max(qm.report(), key=lambda r: r["E_x"])
print("largest output error:", worst["layer"], f"{worst['E_x']:.4g}")
