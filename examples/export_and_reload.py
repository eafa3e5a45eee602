"""Export a ternarized model with torch.export, save it, and reload it in a fresh process.

    python examples/export_and_reload.py
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pt2pass

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2)).eval()
calib = torch.randint(0, 512, (16, 128))
qm = pt2pass.compile(model, calib, config=pt2pass.CompileConfig(seqlen=128), progress=False)

ep = pt2pass.export(qm)
n_ops = sum(1 for n in ep.graph.nodes if n.target is torch.ops.pt2pass.ternary_linear.default)
path = Path(tempfile.mkdtemp()) / "tiny-ternary.pt2"
torch.export.save(ep, str(path))
print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB, {n_ops} pt2pass.ternary_linear nodes)")

ids = torch.randint(0, 512, (1, 12))
torch.save(ids, path.with_suffix(".ids"))
reload = f"""
import torch, pt2pass  # importing pt2pass registers the custom op
ep = torch.export.load({str(path)!r})
print(ep.module()(torch.load({str(path.with_suffix('.ids'))!r})).logits[0, -1, :5])
"""
subprocess.run([sys.executable, "-c", reload], check=True)
with torch.no_grad():
    print(qm(ids).logits[0, -1, :5], "(in this process)")
