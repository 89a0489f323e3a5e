"""Training speed and memory, one run: tiny-step throughput and MFU, ZeRO-2 state per rank for
DP = 1, 2, 4, and DP=2 step time of ZeRO-2 vs plain all-reduce data parallelism.

    python tools/bench/bench_train.py
"""
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import keep_freed_memory, machine, matmul_peak_flops, table

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model as M
import data
import train as T
import world
from parallel import Mesh, setup_mesh
from zero import ZeRO2


class AllReduceAdamW(ZeRO2):
    """The baseline: every DP rank all-reduces the full gradients and keeps the full optimizer state."""

    def __init__(self, named_params, mesh, lr, **kw):
        self.group = mesh.dp_group
        solo = Mesh(mesh.rank, mesh.world, 0, 1, mesh.tp_rank, mesh.tp)      # no sharding
        super().__init__(named_params, solo, lr, **kw)

    def _launch(self, i):
        full = self.take_flat_grad(i)
        dist.all_reduce(full, group=self.group)
        self.grad[i] += full
        self._hold(-full.numel())


def _dp_worker(rank, world, port, tok_path, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    keep_freed_memory()
    mesh = setup_mesh(1)
    args = T.parse_args(["--size", "tiny", "--tokenizer", tok_path, "--out", tempfile.mkdtemp(), "--dtype", "fp32"])
    cfg = M.sphinx_config("tiny")
    tok = T.get_tokenizer(args, mesh, cfg)
    res = {}
    for name, cls in (("plain all-reduce", AllReduceAdamW), ("ZeRO-2", ZeRO2)):
        model = T.build_model(args, mesh, cfg, "fp32")
        opt = cls([(n, p) for n, p in model.named_parameters() if p.requires_grad], mesh, 1e-3)
        src = data.SampleSource([{"path": "synthetic", "ratio": 1}], 0, cfg.canvas, synthetic=world.synthetic_sample)
        batch = data.Batcher(src, tok, model.layout, 320, 16, rank=mesh.dp_rank, world=mesh.dp).next()
        times = []
        for _ in range(steps):
            dist.barrier()
            t = time.perf_counter()
            _, loss = model(batch["tokens"], batch["images"], batch["targets"])
            loss.backward()
            opt.reduce_gradients()
            opt.step(1e-3, clip=0)
            dist.barrier()
            times.append(time.perf_counter() - t)
        res[name] = sorted(times[1:])[len(times[1:]) // 2]
    if rank == 0:
        json.dump(res, open(out, "w"))
    dist.destroy_process_group()


def main():
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as d:
        # 1. the tiny run's training step, in fp32 and in bf16 (MFU against that dtype's own matmul peak)
        rows, base = [], None
        for dtype in ("fp32", "bf16"):
            peak = matmul_peak_flops(M.DTYPES[dtype])
            r = T.train(T.parse_args(["--size", "tiny", "--out", f"{d}/{dtype}", "--steps", "12", "--log-every", "12",
                                      "--eval-per-task", "0", "--from-scratch", "--dtype", dtype,
                                      "--peak-tflops", str(peak / 1e12)]))
            last = json.loads((Path(d) / dtype / "metrics.jsonl").read_text().splitlines()[-1])
            tps, mfu = last["tokens_per_s"], last["mfu"]
            base = base or tps
            rows.append([f"tiny, 1 process, batch 16, {dtype}", f"{tps:,.0f}", f"{tps / base:.2f}x",
                         f"{mfu:.0%} of {peak / 1e9:.0f} GFLOP/s"])
        print(f"tiny training step: {machine()}")
        print(table(rows, ["run", "tokens/s (image positions included)", "vs fp32", "MFU (FLOPs counted by torch)"]))
        # 2. ZeRO-2 state per rank
        model = T.build_model(T.parse_args(["--size", "tiny", "--dtype", "fp32"]), Mesh(0, 1, 0, 1, 0, 1),
                              M.sphinx_config("tiny"), "fp32")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        rows, base = [], None
        for dp in (1, 2, 4):
            opt = ZeRO2(named, Mesh(0, dp, 0, dp, 0, 1), 1e-3)
            b = opt.state_bytes()
            base = base or b
            rows.append([dp, f"{b / 2**20:.2f} MiB", f"{b / base:.3f}", f"{1 / dp:.3f}"])
        print("\ngradient + fp32 master + AdamW moments per rank (tiny, trainable parameters only):")
        print(table(rows, ["DP", "bytes per rank", "vs DP=1", "1/DP"]))
        # 3. DP=2 step time: ZeRO-2 vs plain all-reduce
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(d, "dp.json")
        mp.start_processes(_dp_worker, args=(2, port, os.path.join(d, "fp32", "tokenizer.json"), 8, out), nprocs=2,
                           start_method="spawn")
        res = json.load(open(out))
        base = res["plain all-reduce"]
        print("\nDP=2 (2 processes x 1 thread, gloo), tiny, 16 samples per rank, median step:")
        print(table([[k, f"{v * 1e3:.0f}", f"{base / v:.2f}x"] for k, v in res.items()],
                    ["data parallelism", "ms/step", "speed vs all-reduce"]))


if __name__ == "__main__":
    sys.exit(main())
