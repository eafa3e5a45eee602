"""The whole pipeline on a GPU: compile (calibration + PT² quantizer on the device), the Triton
kernels against the reference, torch.compile with no graph break, export save/load in a fresh
process, and quantizer time on LLaMA-7B-sized layers.

    python3 benchmarks/check_gpu_pipeline.py        # on the device machine
"""
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pt2pass
import pt2pass.lowering.kernels.dispatch as dispatch
from pt2pass.lowering.reference import ternary_linear_reference
from pt2pass.quant import ternarize_weight

assert torch.cuda.is_available(), "needs a GPU"
dev = torch.device("cuda")
print(torch.cuda.get_device_name(), "torch", torch.__version__)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4)
model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
calib = torch.randint(0, 2048, (32, 512), device=dev)
torch.cuda.synchronize()
start = time.perf_counter()
qm = pt2pass.compile(model, calib, config=pt2pass.CompileConfig(seqlen=512), progress=False)
torch.cuda.synchronize()
print(f"compile on GPU (32 x 512 calibration, {len(qm.store)} Linears): {time.perf_counter() - start:.1f} s")
assert all(b.device.type == "cuda" for b in qm.buffers())

ids = torch.randint(0, 2048, (2, 64), device=dev)
with torch.no_grad():
    fast = {m: qm(ids[:, :m] if m > 1 else ids[:1, :1]).logits for m in (1, 64)}
    kernel = dispatch.ternary_linear_triton
    dispatch.ternary_linear_triton = ternary_linear_reference  # the op imports it at call time
    ref = {m: qm(ids[:, :m] if m > 1 else ids[:1, :1]).logits for m in (1, 64)}
    dispatch.ternary_linear_triton = kernel
for m in fast:
    rel = ((fast[m].float() - ref[m].float()).norm() / ref[m].float().norm()).item()
    print(f"kernels vs reference, {m} tokens: relative error {rel:.2e}")
    assert rel < 2e-2

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

counter = CompileCounterWithBackend("inductor")
with torch.no_grad():
    out = torch.compile(qm, backend=counter, fullgraph=True)(ids).logits
rel = ((out.float() - fast[64].float()).norm() / fast[64].float().norm()).item()
print(f"torch.compile: {counter.frame_count} graph(s), relative difference to eager {rel:.2e}")

ep = pt2pass.export(qm)
path = tempfile.mkdtemp() + "/gpu.pt2"
torch.export.save(ep, path)
torch.save(ids.cpu(), path + ".ids")
code = (f"import torch, pt2pass; ep = torch.export.load({path!r}); ids = torch.load({path + '.ids'!r}).cuda();"
        f"torch.save(ep.module()(ids).logits.cpu(), {path + '.out'!r})")
subprocess.run([sys.executable, "-c", code], check=True)
same = torch.equal(torch.load(path + ".out"), fast[64].cpu())
print(f"export: saved, loaded in a fresh process, identical logits: {same}")

for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
    W = torch.randn(n, k, device=dev) * 0.02
    x = torch.randn(8192, k, device=dev) @ (torch.eye(k, device=dev) + 0.1 * torch.randn(k, k, device=dev) / k**0.5)
    H = 2 * x.T @ x / x.shape[0]
    torch.cuda.synchronize()
    start = time.perf_counter()
    r = ternarize_weight(W, H, pt2pass.TernaryConfig())
    torch.cuda.synchronize()
    print(f"ternarize_weight {n}x{k} (SSR, exact, AGA): {time.perf_counter() - start:.2f} s, "
          f"E_x {r.stats['E_x']:.3g}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
