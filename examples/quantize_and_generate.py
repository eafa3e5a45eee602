"""Ternarize the embedded SmolLM2-135M on Shakespeare and generate from it (CPU, ~3 minutes).

    python examples/quantize_and_generate.py
"""
import torch

import pt2pass
from pt2pass.data import DEFAULT_CALIB_PLAYS
from pt2pass.models import load_smollm2, shakespeare_files

model, tok = load_smollm2()
config = pt2pass.CompileConfig(n_samples=16, seqlen=512)
qm = pt2pass.compile(model, shakespeare_files(DEFAULT_CALIB_PLAYS), tok, config)

prompt = tok("KING HENRY: Once more unto the breach,", return_tensors="pt").input_ids
with torch.no_grad():
    out = qm.generate(prompt, max_new_tokens=20)
print(tok.decode(out[0]))
worst = max(qm.report(), key=lambda r: r["E_x"])
print("largest output error:", worst["layer"], f"{worst['E_x']:.4g}")
