"""Where the tiny training step's time goes (bf16 by default, as the main job runs on a CPU with bf16 instructions).

    python tools/bench/profile_train.py                                # the dense tiny step
    python tools/bench/profile_train.py --size tiny-moe                # the upcycled MoE step
    python tools/bench/profile_train.py --size tiny-moe --dtype fp32   # the same in fp32

Prints the step time, the FLOPs torch counts per position, the achieved rate, a profile of three steps
(self time per op) and the data pipeline's time per global batch.
"""
import argparse
import tempfile
import time

from common import machine

import torch
from torch.profiler import profile, ProfilerActivity
import data
import model
import train
import world
from parallel import Mesh
from zero import ZeRO2
cli = argparse.ArgumentParser()
cli.add_argument("--size", choices=("tiny", "tiny-moe"), default="tiny")
cli.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
opts = cli.parse_args()
args = train.parse_args(["--size", opts.size, "--out", tempfile.mkdtemp(), "--dtype", opts.dtype])
mesh = Mesh(0, 1, 0, 1, 0, 1)
cfg = model.sphinx_config(opts.size)
tok = data.Tokenizer(train.DEFAULT_BASE.parent / "tokenizer.json")
sphinx = train.build_model(args, mesh, cfg, opts.dtype)
opt = ZeRO2([(n, p) for n, p in sphinx.named_parameters() if p.requires_grad], mesh, 1e-3)
src = data.SampleSource([{"path": "synthetic", "ratio": 1}], 0, cfg.canvas, synthetic=world.synthetic_sample)
batcher = data.Batcher(src, tok, sphinx.layout, 320, 16, rank=0, world=1)
micro = [batcher.next_micro(2) for _ in range(12)]
for m in micro[:3]:
    train.train_step(sphinx, opt, m, mesh, 1e-4, args, 0.0)
t = time.perf_counter()
for m in micro[3:8]:
    train.train_step(sphinx, opt, m, mesh, 1e-4, args, 0.0)
dt = (time.perf_counter() - t) / 5
toks = sum(b["n_tokens"] for m in micro[3:8] for b in m) / 5
fpt = train.flops_per_token(sphinx, opt, micro[8][0])
print(machine())
print(f"step {dt * 1000:.0f} ms, {toks:.0f} positions/step, {fpt / 1e6:.1f} MFLOP/position "
      f"-> {fpt * toks / dt / 1e9:.0f} GFLOP/s")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for m in micro[9:12]:
        train.train_step(sphinx, opt, m, mesh, 1e-4, args, 0.0)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
t = time.perf_counter()
for _ in range(5):
    batcher.next_micro(2)
print(f"data: {(time.perf_counter() - t) / 5 * 1000:.0f} ms per global batch")
