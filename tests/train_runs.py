"""Shared by the tests of train.py and runs.py: the tiny run's flags, and running train() on 1 or more
processes with the results compared against a single-process run."""
import json
import os

import torch
from safetensors.torch import load_file

import train as T
from multiproc import free_port, spawn

COMMON = ["--size", "tiny", "--batch", "4", "--micro-batch", "2", "--max-len", "320", "--eval-per-task", "0", "--from-scratch",
          "--log-every", "1", "--lr", "2e-3", "--projector-lr", "2e-3", "--seed", "3", "--dtype", "fp32"]


def _worker(rank, world, port, argv, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = T.train(T.parse_args(argv))
    info = {"losses": res["losses"], "state_bytes": res["opt"].state_bytes(), "rank": rank}
    with open(f"{result_path}.{rank}", "w") as f:
        json.dump(info, f)
    torch.distributed.destroy_process_group()


def run(world, argv, tmp_path, name):
    """Run train() on `world` processes; returns per-rank results and the consolidated final weights."""
    out = tmp_path / name
    argv = argv + ["--out", str(out)]
    result = tmp_path / f"{name}.json"
    if world == 1:
        res = T.train(T.parse_args(argv))
        infos = [{"losses": res["losses"], "state_bytes": res["opt"].state_bytes()}]
    else:
        spawn(_worker, (world, free_port(), argv, str(result)), world)
        infos = [json.loads(open(f"{result}.{r}").read()) for r in range(world)]
    return infos, load_file(str(out / "model.safetensors"))


def assert_same(a, b, tol=1e-5):
    (ia, wa), (ib, wb) = a, b
    la, lb = torch.tensor(ia[0]["losses"]), torch.tensor(ib[0]["losses"])
    torch.testing.assert_close(lb, la, rtol=tol, atol=0)
    assert wa.keys() == wb.keys()
    # Adam divides by sqrt(v): where a gradient element is ~0, summation-order noise (1e-7 relative)
    # can move that element by a fraction of lr. So: every element within 0.1 lr, and all but a
    # handful within 1e-5 (lr = 2e-3).
    off = 0
    for k in wa:
        d = (wb[k] - wa[k]).abs()
        assert d.max() <= 2e-4, (k, d.max())
        off += int((d > 1e-5).sum())
    assert off <= 1e-4 * sum(v.numel() for v in wa.values()), off
