"""One-stage training of SPHINX-X: torchrun, DP x TP mesh, hand-written ZeRO-2, checkpoints, resume.

    torchrun --nproc_per_node 1 train.py --size tiny        # or: python train.py --size tiny
    torchrun --nproc_per_node 4 train.py --size tiny --tp 2  # 2 (DP) x 2 (TP)

Read top to bottom: arguments and the paper's recipe, model and tokenizer, evaluation, the loop. The
process mesh and tensor parallelism are in parallel.py, ZeRO-2 in zero.py, the run directory (claim,
checkpoints, resume) in runs.py; every collective is a visible call in one of them.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data as D
import loading as L
import model as M
import released as R
import world as W
from checkpoint import CheckpointError, load_state_strict, unique_state_dict, verify_safetensors
from generate import generate
from moe import total_aux_loss, track_usage, usage_report
from parallel import Mesh, all_reduce, barrier, setup_mesh, world_group
from runs import check_spread, claim_run_dir, load_checkpoint, save_checkpoint
from zero import ZeRO2

# Paper recipe (Sec. 4.1): AdamW (0.9, 0.95), wd 0, lr 2e-5 (5e-6 MoE), 1% linear warm-up, cosine to 0,
# effective batch 256. The CPU sizes keep the schedule with a learning rate that suits a tiny model.
RECIPES = {
    "tiny": dict(lr=1e-3, projector_lr=1e-2, batch=16, micro_batch=8, steps=280, max_len=320, warmup=0.04),
    "tiny-moe": dict(lr=1e-3, projector_lr=1e-2, batch=16, micro_batch=8, steps=200, max_len=320, warmup=0.04),
    "paper": dict(lr=2e-5, batch=256, micro_batch=4, steps=0, max_len=3072, warmup=0.01),
    "paper-moe": dict(lr=5e-6, batch=256, micro_batch=4, steps=0, max_len=3072, warmup=0.01),
}


DEFAULT_BASE = Path(__file__).resolve().parent / "base" / "tiny.safetensors"   # shipped; pretrain.py remakes it


def default_device() -> str:
    """The first of cuda, mps (Apple silicon), cpu that this machine has."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help=f"one of {', '.join(M.SIZES)}")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (the rest are data-parallel)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a mixture JSON file")
    p.add_argument("--tasks-per-image", type=int, default=1,
                   help="synthetic data: up to this many tasks in one conversation about a picture")
    p.add_argument("--out", default=None, help="run directory (default out/<size>)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="effective (global) batch in samples")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per rank per forward")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--projector-lr", type=float, default=None,
                   help="peak lr of the fresh parts (projector, image tags, skip token); default --lr")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first of them this machine has)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights and activations; auto: bf16 on a GPU, on a CPU whichever its matmuls measure "
                        "faster; master weights and AdamW moments stay fp32")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (the paper sizes); CPU sizes train one")
    p.add_argument("--init", default=None, help="a sphinx-x checkpoint to start from")
    p.add_argument("--base", default=None,
                   help="pretrained LLM + encoders (pretrain.py) for a CPU size; default base/tiny.safetensors")
    p.add_argument("--from-scratch", action="store_true", help="CPU sizes: random LLM and encoders, no base")
    p.add_argument("--llm", default=None, help="paper sizes: the pretrained LLM (HF-format directory)")
    p.add_argument("--convnext", default=None, help="paper sizes: the pretrained CLIP-ConvNeXt (safetensors or HF dir)")
    p.add_argument("--dinov2", default=None, help="paper sizes: the pretrained DINOv2 (safetensors or HF dir)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="with --data and no --steps: passes over the data's records (the paper trains 1)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a run directory that holds a run")
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-per-task", type=int, default=40, help="held-out samples per task evaluated at the end")
    p.add_argument("--aux-weight", type=float, default=0.01, help="MoE load-balancing loss weight")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--bucket-mb", type=float, default=32.0, help="ZeRO-2 bucket size")
    p.add_argument("--bad-input", choices=("error", "skip"), default="error")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured on CPU)")
    p.add_argument("--stop-after", type=int, default=None, help="stop (as if killed) after this many steps")
    p.add_argument("--plan", action="store_true",
                   help="print the per-rank memory and a roofline step time for these flags (plan.py), and exit")
    p.add_argument("--plan-dp", type=int, default=8, help="data-parallel ranks the plan assumes")
    args = p.parse_args(argv)
    if args.size not in M.SIZES:
        p.error(f"unknown size {args.size!r}; known: {', '.join(M.SIZES)}")
    recipe = RECIPES.get(args.size) or RECIPES["paper-moe" if "moe" in args.size else "paper"]
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = Path(args.out or f"out/{args.size}")
    args.device = args.device or default_device()
    if args.device not in ("cpu", "cuda", "mps"):
        p.error(f"--device must be cpu, cuda or mps, not {args.device!r} (the rank picks its GPU from LOCAL_RANK)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA GPU")
    if args.device == "mps" and not torch.backends.mps.is_available():
        p.error("--device mps: this machine has no Apple GPU (MPS) available")
    if args.size.startswith("tiny") and not (args.from_scratch or args.init or args.base):
        args.base = str(DEFAULT_BASE)
    if args.base and not Path(args.base).exists():
        p.error(f"no base at {args.base}; make it with `python pretrain.py` or pass --from-scratch")
    parts = [k for k in ("llm", "convnext", "dinov2") if getattr(args, k)]
    if parts and len(parts) < 3:
        p.error("the paper's start needs all of --llm, --convnext and --dinov2 (missing: "
                f"{', '.join('--' + k for k in ('llm', 'convnext', 'dinov2') if not getattr(args, k))})")
    if not args.steps and args.data == "synthetic" and not args.plan:
        p.error(f"--size {args.size}: give --steps (the synthetic data has no epochs) or --data mixture.json")
    for name, ok, want in (("steps", args.steps >= 0, ">= 0 (0: from --epochs)"), ("batch", args.batch > 0, "> 0"),
                           ("micro-batch", args.micro_batch > 0, "> 0"), ("log-every", args.log_every > 0, "> 0"),
                           ("lr", args.lr > 0, "> 0"), ("projector-lr", (args.projector_lr or 1) > 0, "> 0"),
                           ("ckpt-every", args.ckpt_every >= 0, ">= 0"), ("max-len", args.max_len > 0, "> 0"),
                           ("eval-per-task", args.eval_per_task >= 0, ">= 0"), ("epochs", args.epochs > 0, "> 0"),
                           ("tasks-per-image", args.tasks_per_image > 0, "> 0")):
        if not ok:
            p.error(f"--{name} must be {want}, not {getattr(args, name.replace('-', '_'))}")
    return args


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up over the first warmup_frac of the steps, then cosine to 0 (paper Sec. 4.1)."""
    warm = max(1, round(warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


# ----------------------------------------------------------------------------- model and tokenizer

def build_model(args, mesh: Mesh, cfg: M.SphinxConfig, init_path=None) -> M.Sphinx:
    """Every rank builds the same model from the seed. Loaded from files (a checkpoint, a released
    directory, pretrained parts), each rank builds on the meta device and reads only its TP shard; a CPU
    size from its base (or from scratch) is built whole with its random fresh parts, then cut, so that
    any TP computes what one process does."""
    torch.manual_seed(args.seed)
    tp = mesh.tp_group
    if init_path and Path(init_path).is_dir():     # a released SPHINX-X directory
        model = R.load_released(init_path, cfg, tp_group=tp)
        if not L.same_architecture(model.cfg.llm, cfg.llm):
            raise SystemExit(f"--init {init_path}: its LLM ({model.cfg.llm}) is not --size {args.size}'s ({cfg.llm})")
    elif init_path:
        check_spread(mesh, [lambda: verify_safetensors(init_path)])
        model = L.load_sphinx(init_path, tp_group=tp, verify=False)
    elif args.llm:
        model = L.load_parts(cfg, args.llm, args.convnext, args.dinov2, tp_group=tp)
    else:
        model = L.load_base(args.base, cfg) if args.base else M.build_sphinx(cfg)
        if tp is not None:
            full, model = model, M.build_sphinx(model.cfg, init=False, tp_group=tp)
            load_state_strict(model, unique_state_dict(full).items(), shard=L.tp_loading(tp)[1])
            model.mov.freeze_encoders()
    model.to(torch.device(args.device), M.DTYPES[args.dtype])
    model.llm.activation_checkpointing = args.activation_checkpointing
    return model.train()



def tokenizer_corpus(seed: int, canvas: int, n: int = 4000):
    return [D.prompt_text(s.turns + [("", None)]) for s in W.train_samples(seed, n, canvas)]


def get_tokenizer(args, mesh, cfg) -> D.Tokenizer:
    """The paper sizes take their LLM's tokenizer, a run from a base the base's, a run from one of our
    checkpoints (--init) the one beside it; from scratch, CPU sizes
    train a byte-level BPE on the synthetic corpus (rank 0 trains it into the run directory, the others
    read it). A tokenizer.json always ends up in the run directory, for sample.py."""
    path = args.out / "tokenizer.json"
    given = args.tokenizer or (Path(args.base).parent / "tokenizer.json" if args.base else None)
    if not given and args.init and Path(args.init).is_file():
        # Our checkpoint: its run directory (beside it, or above a step-N/ directory) holds the tokenizer it
        # was trained with. A freshly trained one would number the tokens differently: garbage, silently.
        here = Path(args.init).resolve().parent
        given = next((p for p in (here / "tokenizer.json", here.parent / "tokenizer.json") if p.exists()), None)
        if given is None:
            raise SystemExit(f"--init {args.init}: no tokenizer.json in its run directory; pass the one it was "
                             "trained with as --tokenizer")
    if given:
        if not Path(given).exists():
            raise SystemExit(f"no tokenizer at {given}")
        if mesh.is_main and Path(given).suffix == ".json" and Path(given).resolve() != path.resolve():
            shutil.copyfile(given, path)
        barrier(mesh)
        return D.Tokenizer(given)
    if not path.exists():
        if not args.size.startswith("tiny"):
            raise SystemExit(f"--size {args.size} needs --tokenizer (its LLM's tokenizer.model or tokenizer.json)")
        if mesh.is_main:
            D.train_tokenizer(tokenizer_corpus(args.seed, cfg.canvas), cfg.llm.vocab_size, path)
        barrier(mesh)
    tok = D.Tokenizer(path)
    if tok.vocab_size > cfg.llm.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} tokens but the model only {cfg.llm.vocab_size}")
    return tok


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, tok, mesh, samples, max_new_tokens=48) -> dict:
    """Greedy answers for held-out samples (split over DP ranks); per-task accuracy, box tasks by IoU@0.5."""
    totals = {t: [0.0, 0.0] for t in W.TASKS}
    layout = model.layout
    for i, s in enumerate(samples):
        if i % mesh.dp != mesh.dp_rank:
            continue
        turns = s.turns[:-1] + [(s.turns[-1][0], None)]
        enc_tokens = D.prompt_tokens(tok, turns)
        tiles = layout.tile(s.image) if s.image is not None else None
        ids = list(generate(model, enc_tokens, tiles, max_new_tokens, stop_ids=(tok.eos_id,),
                              stop_text="\n" + D.SEP, decode=tok.decode))
        answer = tok.decode(ids).removesuffix("\n" + D.SEP).strip()
        totals[s.task][0] += W.score(s.task, answer, s.turns[-1][1])
        totals[s.task][1] += 1
    flat = torch.tensor([v for t in W.TASKS for v in totals[t]], dtype=torch.float64)
    all_reduce(flat, mesh.dp_group)
    return {t: (flat[2 * i].item(), flat[2 * i + 1].item()) for i, t in enumerate(W.TASKS)}


def image_reliance(model, tok, mesh, samples) -> tuple[float, float]:
    """Mean answer loss on held-out image samples with their own image, and with the image of
    another held-out sample of the same layout (same skip pattern, so the sequence is unchanged).
    Equal losses mean the model answers from the text alone."""
    enc = [D.encode(s, tok, 10 ** 9, model.layout) for s in samples if s.image is not None]
    groups = {}
    for i, e in enumerate(enc):
        groups.setdefault(tuple(e.tiles.fully_padded), []).append(i)
    other = {a: b for g in groups.values() for a, b in zip(g, g[1:] + g[:1])}   # a rotation: nobody keeps theirs
    sums = torch.zeros(3, dtype=torch.float64)                                  # own, other, targets
    dev = model.skip_token.device
    with torch.no_grad():
        for i, e in enumerate(enc):
            if i % mesh.dp != mesh.dp_rank or other[i] == i:
                continue
            b = D.collate([e], tok)
            for k, tiles in enumerate((e.tiles, enc[other[i]].tiles)):
                sums[k] += model(b["tokens"].to(dev), [tiles], b["targets"].to(dev), loss_sum=True)[1].item()
            sums[2] += b["n_targets"]
    all_reduce(sums, mesh.dp_group)
    n = max(sums[2].item(), 1)
    return sums[0].item() / n, sums[1].item() / n


BASELINE_SAMPLES = 2000     # synthetic training samples the text-only baseline looks answers up in
MAX_EMPTY_BATCHES = 10      # consecutive global batches with every sample skipped before a run gives up


# ----------------------------------------------------------------------------- the loop

def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train(args) -> dict:
    mesh = setup_mesh(args.tp, args.device)
    lock, refusal = None, None
    if mesh.is_main:
        try:
            lock = claim_run_dir(args)
        except SystemExit as e:
            refusal = str(e)
    # Every rank learns the main rank's verdict, so a refused run ends everywhere instead of hanging.
    if all_reduce(torch.tensor(float(refusal is not None)), world_group(mesh)).item():
        raise SystemExit(refusal or f"{args.out}: refused by rank 0 (see its message)")
    # --dtype auto: the main rank measures and every rank takes its choice (CPUs may differ between nodes).
    dtype, args.dtype_why = M.pick_dtype(args.dtype, args.device) if mesh.is_main else ("fp32", "")
    bf16 = all_reduce(torch.tensor(float(dtype == "bf16")), world_group(mesh)).item() > 0
    args.dtype = "bf16" if bf16 else "fp32"
    try:
        return _train(args, mesh)
    finally:
        if lock:
            lock.unlink(missing_ok=True)


def _train(args, mesh) -> dict:
    log = (lambda *a: print(*a, flush=True)) if mesh.is_main else (lambda *a: None)
    cfg = M.sphinx_config(args.size)
    tok = get_tokenizer(args, mesh, cfg)
    model = build_model(args, mesh, cfg, args.init)
    dev = model.skip_token.device          # every tensor a step creates goes here
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    fresh_scale = (args.projector_lr or args.lr) / args.lr
    opt = ZeRO2(trainable, mesh, args.lr, bucket_numel=int(args.bucket_mb * 2 ** 20 / 4),
                lr_scale=lambda name: 1.0 if name.startswith("llm.") else fresh_scale)
    if args.batch % (args.micro_batch * mesh.dp):
        raise SystemExit(f"--batch {args.batch} must be a multiple of micro-batch {args.micro_batch} x DP {mesh.dp}")
    accum = args.batch // (args.micro_batch * mesh.dp)
    skips = D.Skips(args.bad_input)
    entries = ([{"path": "synthetic", "ratio": 1.0, "tasks_per_image": args.tasks_per_image}] if args.data == "synthetic"
               else D.read_mixture(args.data))
    source = D.SampleSource(entries, args.seed, cfg.canvas, skips=skips, synthetic=W.synthetic_sample)
    if not args.steps:            # the paper's length: epochs over the records (Sec. 4.1 trains one)
        records = sum(len(d) for d in source.datasets if d != "synthetic")
        args.steps = max(1, math.ceil(args.epochs * records / args.batch))
        log(f"{args.epochs:g} epoch(s) of {records:,} records at batch {args.batch} = {args.steps:,} steps")
    # The batcher's unit is the whole global batch, so its composition does not depend on DP or accumulation.
    batcher = D.Batcher(source, tok, model.layout, args.max_len, args.batch, rank=mesh.dp_rank, world=mesh.dp)
    step, losses = 0, []
    if args.resume:
        step, losses = load_checkpoint(args, mesh, model, opt, batcher)
        log(f"resumed from step {step}")
    is_moe = cfg.llm.n_experts > 0
    # The load-balancing loss, averaged over layers, micro-batches and DP ranks; /tp: the router's
    # gradient is summed over TP (parallel.partial_grad).
    aux_scale = args.aux_weight / (accum * mesh.dp * mesh.tp) if is_moe else 0.0
    n_train = sum(p.numel() for _, p in trainable)
    log(f"SPHINX-X {args.size}: {n_train:,} trainable + {frozen:,} frozen parameters; DP {mesh.dp} x TP {mesh.tp}; "
        f"batch {args.batch} = {args.micro_batch} x {accum} accumulation x {mesh.dp} DP; at most "
        f"{args.batch * args.max_len:,} tokens/step (image blocks included); per rank: weights {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB, "
        f"grad + optimizer shards {opt.state_bytes() / 2**20:.0f} MiB; lr {args.lr:g}"
        f"{f' (projector {args.projector_lr:g})' if args.projector_lr else ''}, {args.steps} steps; "
        f"{args.dtype} ({args.dtype_why})")
    peak = (args.peak_tflops or 0) * 1e12 or M.matmul_flops(M.DTYPES[args.dtype], 2048, dev)
    metrics = open(args.out / "metrics.jsonl", "a") if mesh.is_main else None
    t0, tok_count, flops_per_token = time.perf_counter(), 0, None
    t_start, step0, throughput = t0, step, {}
    empty_batches = 0
    while step < args.steps:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        micro = batcher.next_micro(accum)
        n_targets = all_reduce(torch.tensor(float(sum(b["n_targets"] for b in micro))), mesh.dp_group).item()
        if n_targets == 0:
            # Every sample of the global batch was skipped (--bad-input skip): draw the next one, but
            # stop with a clear line rather than loop forever over data that is all bad.
            empty_batches += 1
            if empty_batches == MAX_EMPTY_BATCHES:
                raise SystemExit(f"{MAX_EMPTY_BATCHES} global batches in a row had no usable sample; "
                                 f"the data looks unusable. {skips.report()}")
            continue
        empty_batches = 0
        loss_sum = torch.zeros((), device=dev)
        for b in micro:
            if not b["n_samples"]:              # all of this micro-batch skipped: only join the reduction
                opt.reduce_gradients()
                continue
            fwd_bwd = lambda: micro_step(model, b, n_targets, aux_scale, dev)
            if flops_per_token is None:
                # FLOPs per position, counted once on a throw-away pass (a dispatch mode may change
                # kernels, so the real steps never run under it: resumed runs stay bit-identical).
                with opt.hooks_paused():
                    flops_per_token = count_flops(fwd_bwd) / max(b["n_tokens"], 1)
                model.zero_grad(set_to_none=True)
            loss_sum += fwd_bwd()               # ZeRO-2 reduce-scatters each bucket as backward completes it
            opt.reduce_gradients()
            tok_count += b["n_tokens"] * mesh.dp
        gnorm = opt.step(lr, args.grad_clip)
        loss_val = all_reduce(loss_sum, mesh.dp_group).item() / max(n_targets, 1)
        losses.append(loss_val)
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            dt = time.perf_counter() - t0
            tps = tok_count / dt
            # nan until this rank has run a micro-batch (all of its samples may have been skipped)
            mfu = (flops_per_token or float("nan")) * tps / (peak * mesh.world)
            eta = (time.perf_counter() - t_start) / (step - step0) * (args.steps - step)
            log(f"step {step:5d}/{args.steps} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm {gnorm:.2f} | "
                f"{tps:,.0f} tokens/s | MFU {mfu:.1%} of {peak / 1e9:.0f} GFLOP/s/rank | ETA {eta / 60:.1f} min")
            if metrics:
                metrics.write(json.dumps({"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm,
                                          "tokens_per_s": tps, "mfu": mfu}) + "\n")
                metrics.flush()
            t0, tok_count = time.perf_counter(), 0
            throughput = {"tokens_per_s": tps, "mfu": mfu, "peak_flops": peak}
        if args.ckpt_every and step % args.ckpt_every == 0 and step < args.steps:
            save_checkpoint(args, mesh, model, opt, batcher, step, losses)
        if args.stop_after and step >= args.stop_after:
            log(f"stopping after step {step} (--stop-after)")
            return {"losses": losses, "mesh": mesh, "model": model, "opt": opt, "throughput": throughput}
    save_checkpoint(args, mesh, model, opt, batcher, step, losses)
    log(f"saved {args.out / 'model.safetensors'} (and {args.out / 'tokenizer.json'})")
    if skips.reasons:
        log(skips.report())
    result = {"losses": losses, "mesh": mesh, "model": model, "opt": opt, "throughput": throughput}
    if args.eval_per_task:
        result.update(final_report(args, mesh, model, tok, cfg.canvas, log))
    return result


def micro_step(model, b, n_targets: float, aux_scale: float, dev) -> torch.Tensor:
    """Forward and backward of one micro-batch; its summed answer loss. The gradient is of the global
    batch's mean answer loss (n_targets: the answer tokens of the whole global batch)."""
    _, loss = model(b["tokens"].to(dev), b["images"], b["targets"].to(dev), loss_sum=True, loss_only=True)
    total = loss / max(n_targets, 1)
    if aux_scale:
        total = total + aux_scale * total_aux_loss(model)
    total.backward()
    return loss.detach()


def final_report(args, mesh, model, tok, canvas: int, log) -> dict:
    """Held-out accuracy per task beside the text-only baseline, image reliance, expert usage."""
    is_moe = model.cfg.llm.n_experts > 0
    if is_moe:
        track_usage(model)
    held_out = W.eval_per_task(args.seed, args.eval_per_task, canvas)
    scores = evaluate(model, tok, mesh, held_out)
    result = {}
    if mesh.is_main:
        # The floor to beat: each question answered from synthetic training samples' text alone.
        blind = W.text_only_baseline(
            W.train_samples(args.seed, BASELINE_SAMPLES, canvas, args.tasks_per_image), held_out)
        log(f"held-out evaluation (greedy; box tasks: every box at IoU >= 0.5; text-only baseline: each "
            f"question's most common answer in {BASELINE_SAMPLES:,} training samples, image unseen):")
        for task, (right, n) in scores.items():
            if n:
                log(f"  {task:10s} {right / n:6.1%}  ({int(right)}/{int(n)}; text-only baseline "
                    f"{blind[task][0] / n:.1%})")
        result["text_only_baseline"] = blind
    own, other = image_reliance(model, tok, mesh, held_out)
    log(f"image reliance: held-out answer loss {own:.3f} with each sample's own image, {other:.3f} with "
        f"another sample's image (ratio {own / max(other, 1e-9):.2f}; 1 means the answers ignore the image)")
    if is_moe:
        log("expert usage during evaluation:\n" + usage_report(model))
    result["eval"], result["image_reliance"] = scores, (own, other)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.plan:                                   # builds on the meta device only: allocates nothing
        import plan
        p = plan.plan(M.sphinx_config(args.size), args.plan_dp, args.tp, args.micro_batch, args.max_len,
                      bucket_numel=int(args.bucket_mb * 2 ** 20 / 4),
                      weight_bytes=4 if args.dtype == "fp32" else 2, checkpointing=args.activation_checkpointing)
        print(plan.table([(args.size, p | {"dp": args.plan_dp, "tp": args.tp})]))
        return
    try:
        train(args)
    except (CheckpointError, D.DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                       # ENOSPC while saving, a read-only run directory, ...
        what = "disk full" if e.errno == errno.ENOSPC else e.strerror
        print(f"error: {what} ({e.filename or 'while writing'})", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
