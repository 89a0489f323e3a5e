"""Shared measuring helpers: every bench prints ratios against references measured in the same run."""
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the project root

import torch  # noqa: E402


def keep_freed_memory():
    """Stop glibc from returning freed blocks to the OS (CPU only, Linux).

    Without this, every large activation and gradient of a training step is a fresh
    mmap: the first write to each page faults, and on this 2-core machine that costs
    ~10% of a step. Both implementations in a bench run under the same setting.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 40))


def timeit(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Median seconds of each fn, measured in turn round after round, in a fresh (seeded) order each
    round: the machine's slow spells (this VM drifts by 10% within a minute) and what the previous
    implementation left in the caches fall on every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def matmul_flops(dtype, n: int = 512, repeat: int = 3) -> float:
    """FLOP/s of an n^3 matmul in `dtype` on the CPU, best of `repeat` after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def matmul_peak_flops(dtype=torch.float32) -> float:
    """FLOP/s of a 2048^3 matmul on the CPU: the peak MFU is measured against (run it on a quiet machine)."""
    return matmul_flops(dtype, 2048)


def copy_bandwidth(nbytes: int = 512 * 2 ** 20) -> float:
    """Bytes/s read by a large tensor copy (read + write counted as 2x bytes moved; this returns read rate)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return nbytes / timeit(lambda: dst.copy_(src), warmup=2, repeat=7)


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    return "\n".join(out)


def cpu_name_and_flags() -> str:
    """The CPU model and the flags that decide its matmul speed (Linux /proc/cpuinfo)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "CPU unknown"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "CPU")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(have) or 'no avx2'})"


def machine() -> str:
    """What every table header names: CPU, flags, cores, torch, and its fp32 and bf16 matmul peaks."""
    f32, b16 = (matmul_flops(dt, 1024) / 1e9 for dt in (torch.float32, torch.bfloat16))
    return (f"{cpu_name_and_flags()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; 1024^3 matmul fp32 {f32:.0f} / bf16 {b16:.0f} GFLOP/s")
