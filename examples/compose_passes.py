"""Compose the pass pipeline yourself on any module with Linear layers (runs in seconds).

    python examples/compose_passes.py
"""
import torch
from torch import nn

from pt2pass import (CompileConfig, FoldPermutations, InsertPermutations, LowerTernaryLinear,
                     PassManager, SequentialTernarize, capture, store_of)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 256)).eval()
calib = torch.randn(256, 256)

gm = capture(model, (calib[:8],))                       # aten graph, Linears tagged by weight FQN
batches = [((x,), {}) for x in calib.split(64)]         # calibration inputs, as graph calls
fold = FoldPermutations()
pm = PassManager([SequentialTernarize(batches, CompileConfig(skip=()), progress=False),
                  InsertPermutations(), fold, LowerTernaryLinear()])
gm = pm(gm)

for record in pm.history:
    print(f"{record.name:<20} modified={record.modified} {record.seconds:.2f} s")
print("gathers folded:", fold.folded, "remaining:", fold.remaining)
print(gm.graph)
x = torch.randn(4, 256)
with torch.no_grad():
    rel = ((gm(x) - model(x)).norm() / model(x).norm()).item()
print(f"relative output error vs full precision: {rel:.3f}")
print({fqn: round(layer.stats["E_x"], 4) for fqn, layer in store_of(gm).layers.items()})
