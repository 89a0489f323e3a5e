"""moe_kernels.py: every expert path (Triton under the interpreter, the CPU paths) against a float64 loop,
the path chooser, and the project without triton."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_kernels

ROOT = Path(__file__).resolve().parent.parent


def _reference(x, w1, w3, w2, offsets, grad):
    """Float64 per-expert loop: forward and all four gradients."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w3, w2)]
    y = moe_kernels.swiglu_reference(*leaves, offsets)
    y.backward(grad.double())
    return y.detach(), [t.grad for t in leaves]


KERNEL_CASES = [  # (experts, tokens per expert, d, hidden): zero-token experts, one token, odd dims
    (5, [0, 1, 70, 0, 33], 40, 72),
    (3, [65, 64, 1], 33, 100),
    (8, "random", 64, 96),
]


NO_TRITON = pytest.mark.skipif(not moe_kernels.HAS_TRITON, reason="triton is not installed (no wheels on this platform)")
PATH_DTYPES = [pytest.param("triton", dt, marks=NO_TRITON) for dt in (torch.float32, torch.float16)] + [
    (p, dt) for p in ("grouped", "loop", "padded") for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("path,dtype", PATH_DTYPES)
@pytest.mark.parametrize("E,counts,d,hidden", KERNEL_CASES)
def test_every_path_matches_float64_loop(path, dtype, E, counts, d, hidden):
    g = torch.Generator().manual_seed(E * 100 + d)
    if counts == "random":
        counts = torch.randint(0, 40, (E,), generator=g)
        counts[torch.randint(0, E, (2,), generator=g)] = 0
    counts = torch.as_tensor(counts)
    offsets = counts.cumsum(0)
    M_ = int(offsets[-1])
    x = torch.randn(M_, d, generator=g).to(dtype).requires_grad_()
    ws = [(0.2 * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()
          for shape in ((E, hidden, d), (E, hidden, d), (E, d, hidden))]
    grad = torch.randn(M_, d, generator=g).to(dtype)
    if path == "grouped" and (d * x.element_size()) % 16:
        with pytest.raises(RuntimeError, match="16 bytes"):    # _grouped_mm's rule; the chooser skips it
            moe_kernels.swiglu_experts(x, *ws, offsets, path)
        return
    y = moe_kernels.swiglu_experts(x, *ws, offsets, path)
    y.backward(grad)
    y_ref, grads_ref = _reference(x, *ws, offsets, grad)
    # fp32: tight. fp16/bf16: inputs and stored intermediates are rounded (8 / 11 significant bits).
    rel = {torch.float32: 2e-6, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    for name, got, ref in [("y", y, y_ref), *zip(("dx", "dw1", "dw3", "dw2"), (x.grad, *(w.grad for w in ws)), grads_ref)]:
        assert got.dtype == dtype
        err = (got.double() - ref).abs().max().item()
        assert err <= rel * max(ref.abs().max().item(), 1.0), (name, err)
    # experts with no tokens get exactly zero weight gradients
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert all(w.grad[e].abs().max() == 0 for w in ws)


def test_chooser_takes_the_fastest_per_bucket_and_remembers(monkeypatch):
    E, d, hidden = 4, 36, 20        # d * 4 bytes = 144: aligned; hidden 20 * 4 = 80 also
    torch.manual_seed(0)
    ws = [torch.randn(*s, requires_grad=True) for s in ((E, hidden, d), (E, hidden, d), (E, d, hidden))]
    offsets = torch.tensor([3, 3, 9, 12])
    x = torch.randn(12, d)
    fake = {"grouped": 3.0, "loop": 1.0, "padded": 2.0}        # seconds each path "takes"
    timed = []

    def time_paths(self, grads, *args):
        timed.append(grads)
        return dict(fake)
    monkeypatch.setattr(moe_kernels.ExpertPathChooser, "time_paths", time_paths)
    chooser = moe_kernels.ExpertPathChooser()
    assert chooser(x, *ws, offsets, True) == "loop"
    assert chooser(x[:9], *ws, torch.tensor([3, 3, 9, 9]), True) == "loop" and len(timed) == 1   # 9 and 12 rows: bucket 16
    fake["loop"] = 9.0
    assert chooser(x, *ws, offsets, False) == "padded"     # no gradients: its own bucket, timed anew
    assert timed == [True, False]
    assert chooser(x[:3], *ws, torch.tensor([3, 3, 3, 3]), True) == "padded" and len(timed) == 3   # 3 rows: bucket 4


def test_chooser_times_real_paths_without_side_effects():
    E, d, hidden = 4, 33, 20        # d = 33: _grouped_mm cannot run, so it must come out inf
    torch.manual_seed(0)
    ws = [torch.randn(*s, requires_grad=True) for s in ((E, hidden, d), (E, hidden, d), (E, d, hidden))]
    x, offsets = torch.randn(10, d), torch.tensor([2, 5, 5, 10])
    rng = torch.get_rng_state()
    chooser = moe_kernels.ExpertPathChooser()
    best = chooser(x, *ws, offsets, True)
    (timings,) = chooser.timings.values()
    assert timings["grouped"] == float("inf") and best in ("loop", "padded")
    assert 0 < timings[best] == min(timings.values()) < 1
    assert torch.equal(torch.get_rng_state(), rng) and all(w.grad is None for w in ws)


@pytest.mark.parametrize("path", ["grouped", "loop", "padded"])
def test_flop_count_of_every_cpu_path_is_the_experts_arithmetic(path):
    """FlopCounterMode with FLOP_FORMULAS counts a forward + backward of the experts as 18 M d hidden
    (3 matmuls forward, 6 backward) on every path, _grouped_mm's included; padded rows add the padding."""
    from torch.utils.flop_counter import FlopCounterMode
    counts, d, hidden = [5, 0, 11, 3], 16, 24
    offsets = torch.tensor(counts).cumsum(0)
    M, E = sum(counts), len(counts)
    x = torch.randn(M, d, requires_grad=True)
    ws = [torch.randn(E, *s, requires_grad=True) for s in ((hidden, d), (hidden, d), (d, hidden))]
    with FlopCounterMode(display=False, custom_mapping=moe_kernels.FLOP_FORMULAS) as counter:
        moe_kernels.swiglu_experts(x, *ws, offsets, path).sum().backward()
    rows = E * max(counts) if path == "padded" else M
    assert counter.get_total_flops() == 18 * rows * d * hidden


@NO_TRITON
def test_tile_table_skips_empty_experts():
    offsets = torch.tensor([0, 130, 130, 131])         # experts 0 and 2 are empty
    expert, row = moe_kernels._tile_table(offsets, 131, 64)
    valid = expert >= 0
    assert expert[valid].tolist() == [1, 1, 1, 3] and row[valid].tolist() == [0, 64, 128, 130]
    assert len(expert) == 3 + 4                        # upper bound cdiv(M, BM) + E; the rest are spare


def test_everything_imports_and_runs_without_triton():
    """sys.modules["triton"] = None makes `import triton` fail as on macOS/Windows: every module imports,
    "auto" picks a CPU path, the Triton path says what it needs in one line."""
    code = """
import sys; sys.modules["triton"] = None
import torch, model, vision, moe, tiling, data, generate, train, sample
import moe_kernels
assert not moe_kernels.HAS_TRITON
layer = moe.MoEFeedForward(16, 24, 4, 2); layer.init_weights()
x = torch.randn(10, 16, requires_grad=True)
layer(x).sum().backward()
layer.path = "triton"
try:
    layer(x)
except RuntimeError as e:
    assert "needs the triton package" in str(e), e
else:
    raise AssertionError("the triton path ran without triton")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
