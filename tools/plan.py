"""A plan before a run: per-rank memory and a roofline step time for any size at any DP x TP, allocating nothing.

    python plan.py --size sphinx-moe --tp 8 --dp 8          (train.py --plan prints the same for its flags)

Bytes are counted from the model built on the meta device, with the rules train.py follows: TP splits the
tensors parallel.split_dim names, ZeRO-2 keeps an fp32 gradient shard, fp32 master weights and two fp32
AdamW moments per 1/DP of the trainable parameters, and while the backward runs the gradients of about
two buckets plus the fp32 flat buffers of the reduce-scatters in flight (zero.py). Activations follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", Sec. 4), with flash attention (no s^2 term). Time is a roofline:
FLOPs at the GPU's dense bf16 peak, plus the collectives' bytes at its link bandwidth, not overlapped.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import model as M
from parallel import split_dim
from zero import MAX_IN_FLIGHT

# NVIDIA H100 SXM5 datasheet: BF16 dense 989 TFLOP/s (1,979 with sparsity), HBM3 3.35 TB/s, NVLink 900 GB/s
# total (450 GB/s each way), 80 GB.
GPUS = {"h100-sxm": {"flops": 989e12, "link": 450e9, "memory": 80e9}}


def encoder_flops(cfg: M.SphinxConfig) -> int:
    """Forward FLOPs of both frozen encoders on the views of one image (all 1 + grid^2 views)."""
    with torch.device("meta"):
        mov = M.MixtureOfVisualExperts(cfg.convnext, cfg.vit, cfg.llm.dim)
    views = torch.empty(1 + cfg.grid ** 2, 3, cfg.view_size, cfg.view_size, device="meta")
    with FlopCounterMode(display=False) as f:
        mov.encode_frozen(views)
    return f.get_total_flops()


def grads_held(trainable: int, largest: int, bucket_numel: int, weight_bytes: int) -> int:
    """Bytes of full gradients ZeRO-2 holds at once during backward: the parameters' own gradients of
    about two buckets (one filling while the previous one's last tensor lands; a tensor larger than a
    bucket is a bucket), plus an fp32 flat buffer for the bucket being packed and each one in flight."""
    bucket = min(max(bucket_numel, largest), trainable)
    return min(2 * bucket, trainable) * weight_bytes + min((MAX_IN_FLIGHT + 1) * bucket, trainable) * 4


def plan(cfg: M.SphinxConfig, dp: int = 1, tp: int = 1, micro_batch: int = 1, seq_len: int = 2048, accum: int = 1,
         weight_bytes: int = 2, checkpointing: bool = False, gpu: str = "h100-sxm", bucket_numel: int = 8 << 20) -> dict:
    with torch.device("meta"):
        model = M.Sphinx(cfg)
    model.mov.freeze_encoders()
    local = lambda n, p: p.numel() // (tp if split_dim(n) is not None else 1)
    trainable = sum(local(n, p) for n, p in model.named_parameters() if p.requires_grad)
    largest = max(local(n, p) for n, p in model.named_parameters() if p.requires_grad)
    frozen = sum(local(n, p) for n, p in model.named_parameters() if not p.requires_grad)
    shard = -(-trainable // dp)                           # ZeRO-2 pads each bucket to a multiple of DP
    L, h, V = cfg.llm.n_layers, cfg.llm.dim, cfg.llm.vocab_size
    s, b = seq_len, micro_batch
    per_layer = s * b * h * (10 + 24 / tp)                # bf16 activations of one block (flash attention)
    acts = (2 * s * b * h * L + per_layer) if checkpointing else per_layer * L
    acts += s * b * V / tp * 4                            # fp32 logits for the loss
    out = {"weights": (trainable + frozen) * weight_bytes,
           "grads_held": grads_held(trainable, largest, bucket_numel, weight_bytes),
           "zero2_state": shard * 16, "activations": acts}           # grad shard + master + m + v, fp32
    out["total"] = sum(out.values())
    # Time: 6 FLOPs per active LLM parameter per token (forward + backward), the encoders forward only.
    llm = sum(p.numel() for n, p in model.llm.named_parameters() if ".feed_forward.w" not in n or not cfg.llm.n_experts)
    if cfg.llm.n_experts:
        experts = sum(p.numel() for n, p in model.llm.named_parameters() if ".feed_forward.w" in n)
        llm += experts * cfg.llm.top_k // cfg.llm.n_experts
    tokens = s * b * accum
    enc = encoder_flops(cfg) * b * accum
    flops = (6 * llm * tokens + enc) / tp                  # the model's FLOPs (MFU's numerator)
    recompute = 2 * llm * tokens / tp if checkpointing else 0   # checkpointing runs each block's forward twice
    g = GPUS[gpu]
    compute = (flops + recompute) / g["flops"]
    ring = lambda nbytes, n: 2 * (n - 1) / n * nbytes if n > 1 else 0.0
    # ZeRO-2: reduce-scatter fp32 gradients, all-gather bf16 weights (each half a ring all-reduce); TP: four
    # all-reduces of the block's (s, b, h) activations per layer and micro-batch (two forward, two backward).
    comm_bytes = ring(trainable * 4, dp) / 2 + ring(trainable * weight_bytes, dp) / 2 + \
        4 * L * accum * ring(s * b * h * weight_bytes, tp)
    comm = comm_bytes / g["link"]
    out.update(flops=flops, compute_s=compute, comm_s=comm, step_s=compute + comm,
               mfu=flops / g["flops"] / (compute + comm),
               fits=out["total"] <= g["memory"], trainable=trainable, frozen=frozen)
    return out


def table(rows: list[tuple[str, dict]]) -> str:
    gib = lambda x: f"{x / 2**30:,.1f}"
    lines = ["| size | DP x TP | weights | grads held | ZeRO-2 fp32 state | activations | total GiB | fits 80 GB | step s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in rows:
        lines.append(f"| {name} | {p['dp']} x {p['tp']} | {gib(p['weights'])} | {gib(p['grads_held'])} | "
                     f"{gib(p['zero2_state'])} | {gib(p['activations'])} | {gib(p['total'])} | "
                     f"{'yes' if p['fits'] else 'no'} | {p['step_s']:.2f} | {p['mfu']:.0%} |")
    return "\n".join(lines)


PAPER_TP = {"sphinx-tiny": 1, "sphinx-intern2": 1, "sphinx-plus": 2, "sphinx-plus-2k": 2, "sphinx-moe": 8}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, help="one size (default: the paper's five at their TP)")
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=3072)
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for size in [args.size] if args.size else PAPER_TP:
        if size not in M.SIZES:
            p.error(f"unknown size {size!r}; known: {', '.join(M.SIZES)}")
        tp = args.tp or PAPER_TP.get(size, 1)
        r = plan(M.sphinx_config(size), args.dp, tp, args.micro_batch, args.seq_len,
                 checkpointing=args.activation_checkpointing)
        rows.append((size, r | {"dp": args.dp, "tp": tp}))
    print(f"per-rank plan, micro-batch {args.micro_batch} x {args.seq_len} positions, bf16 weights, "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, H100 SXM roofline:")
    print(table(rows))


if __name__ == "__main__":
    main()
