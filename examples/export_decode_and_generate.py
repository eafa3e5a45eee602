"""Generate with a static KV cache, export the decode graph, generate from it in a fresh process.

    python examples/export_decode_and_generate.py
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
                                     num_key_value_heads=2, max_position_embeddings=512)).eval()
ternary = pt2pass.TernaryConfig(method="rtn", aga=False, compensation="none", order="natural")
qm = pt2pass.compile(model, None, config=pt2pass.CompileConfig(ternary=ternary), progress=False)
del model  # qm keeps what decode graphs need (its skeleton), not the full-precision Linears

ids = torch.randint(0, 512, (1, 12))
cached = qm.generate(ids, max_new_tokens=16)                  # prefill + 16 decode steps
print("static cache: ", cached[0, 12:].tolist())
print("no cache:     ", qm.generate_no_cache(ids, max_new_tokens=16)[0, 12:].tolist())

# The decode graph as a program: (input_ids (1, S), cache_position (S,)) -> last logits; the KV
# cache is the program's buffers, written in place.
ep = pt2pass.export(qm, graph="decode", batch_size=1, max_cache_len=64)
path = Path(tempfile.mkdtemp()) / "tiny-decode.pt2"
torch.export.save(ep, str(path))
torch.save(ids, path.with_suffix(".ids"))
reload = f"""
import torch, pt2pass  # importing pt2pass registers the custom op
from pt2pass.decode import generate_with_program
ep = torch.export.load({str(path)!r})
out = generate_with_program(ep, torch.load({str(path.with_suffix('.ids'))!r}), 16)
print("fresh process:", out[0, 12:].tolist())
"""
subprocess.run([sys.executable, "-c", reload], check=True)
