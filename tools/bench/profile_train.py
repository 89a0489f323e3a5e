"""Where the tiny training step's time goes (bf16, as the main job runs on a CPU with bf16 instructions).

    python tools/bench/profile_train.py

Prints the step time, the FLOPs torch counts per position, the achieved rate, a profile of three steps
(self time per op) and the data pipeline's time per global batch.
"""
import tempfile
import time

from common import machine

import torch
from torch.profiler import profile, ProfilerActivity
import train as T, model as M, data as D, world as W, loading
from parallel import Mesh
from zero import ZeRO2
args = T.parse_args(["--size", "tiny", "--out", tempfile.mkdtemp(), "--dtype", "bf16"])
mesh = Mesh(0, 1, 0, 1, 0, 1)
cfg = M.sphinx_config("tiny")
tok = D.Tokenizer(T.DEFAULT_BASE.parent / "tokenizer.json")
model = T.build_model(args, mesh, cfg, "bf16")
opt = ZeRO2([(n, p) for n, p in model.named_parameters() if p.requires_grad], mesh, 1e-3)
src = D.SampleSource([{"path": "synthetic", "ratio": 1}], 0, cfg.canvas, synthetic=W.synthetic_sample)
batcher = D.Batcher(src, tok, model.layout, 320, 16, rank=0, world=1)
micro = [batcher.next_micro(2) for _ in range(12)]
for m in micro[:3]:
    T.train_step(model, opt, m, mesh, 1e-4, args, 0.0)
t = time.perf_counter()
for m in micro[3:8]:
    T.train_step(model, opt, m, mesh, 1e-4, args, 0.0)
dt = (time.perf_counter() - t) / 5
toks = sum(b["n_tokens"] for m in micro[3:8] for b in m) / 5
fpt = T.flops_per_token(model, opt, micro[8][0])
print(machine())
print(f"step {dt*1000:.0f} ms, {toks:.0f} positions/step, {fpt/1e6:.1f} MFLOP/position -> {fpt*toks/dt/1e9:.0f} GFLOP/s")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for m in micro[9:12]:
        T.train_step(model, opt, m, mesh, 1e-4, args, 0.0)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
t = time.perf_counter(); data_t = [batcher.next_micro(2) for _ in range(5)]; print(f"data: {(time.perf_counter()-t)/5*1000:.0f} ms per global batch")
