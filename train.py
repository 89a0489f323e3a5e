"""One-stage training of SPHINX-X (paper Sec. 3.2, 4.1): torchrun, DP x TP mesh, hand-written ZeRO-2.

    torchrun --nproc_per_node 1 train.py --size tiny        # or: python train.py --size tiny
    torchrun --nproc_per_node 4 train.py --size tiny --tp 2  # 2 (DP) x 2 (TP)

Read top to bottom: the recipe and arguments, the model and tokenizer, `evaluate`, `train_step`, the
loop. The process mesh and tensor parallelism are in parallel.py, ZeRO-2 in zero.py, the run directory
(claim, checkpoints, resume) in runs.py; every collective is a visible call in one of them.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import loading
from model import DTYPES, SIZES, Sphinx, SphinxConfig, build_sphinx, sphinx_config
import world
from checkpoint import CheckpointError, load_state_strict, unique_state_dict, verify_safetensors
from generate import generate
from moe import total_aux_loss, track_usage, usage_report
from moe_kernels import FLOP_FORMULAS
from parallel import Mesh, agree, all_reduce, barrier, gather_lists, setup_mesh
from runs import RunError, atomic_write, check_spread, claim_run_dir, draw_run, load_checkpoint, run_dtype, save_checkpoint
from zero import ZeRO2

# Paper recipe (Sec. 4.1): AdamW (0.9, 0.95), wd 0, lr 2e-5 (5e-6 MoE), 1% linear warm-up, cosine to 0,
# effective batch 256. The CPU sizes keep the schedule with a learning rate that suits a tiny model.
RECIPES = {
    "tiny": dict(lr=1e-4, projector_lr=3e-3, batch=16, micro_batch=8, steps=1400, max_len=320, warmup=0.04),
    "tiny-moe": dict(lr=1e-4, projector_lr=3e-3, batch=16, micro_batch=8, steps=200, max_len=320, warmup=0.04),
    "paper": dict(lr=2e-5, batch=256, micro_batch=4, steps=0, max_len=3072, warmup=0.01),
    "paper-moe": dict(lr=5e-6, batch=256, micro_batch=4, steps=0, max_len=3072, warmup=0.01),
}
DEFAULT_BASE = Path(__file__).resolve().parent / "base" / "tiny.safetensors"   # tools/pretrain.py remakes it
BASELINE_SAMPLES = 2000     # synthetic training samples the text-only baseline looks answers up in
MAX_EMPTY_BATCHES = 10      # consecutive global batches with every sample skipped before a run gives up


def recipe_of(size: str) -> dict:
    return RECIPES.get(size) or RECIPES["paper-moe" if "moe" in size else "paper"]


def recipe_help() -> str:
    keys = ("steps", "batch", "micro_batch", "lr", "projector_lr", "max_len")
    rows = [f"  {name:10s} " + ", ".join(f"{k.replace('_', '-')} {r[k]:g}" for k in keys if k in r)
            for name, r in RECIPES.items()]
    return "recipes (defaults per --size; paper sizes take 'paper' or 'paper-moe'; steps 0: from --epochs):\n" + \
        "\n".join(rows)


def default_device() -> str:
    """The first of cuda, mps (Apple silicon), cpu that this machine has."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def parse_args(argv=None):
    """The flags, with each size's recipe filled in; nothing changes them afterwards."""
    p = argparse.ArgumentParser(description=__doc__, epilog=recipe_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help=f"one of {', '.join(SIZES)}")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (the rest are data-parallel)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a mixture JSON file")
    p.add_argument("--tasks-per-image", type=int, default=1,
                   help="synthetic data: up to this many tasks in one conversation about a picture")
    p.add_argument("--out", default=None, help="run directory (default out/<size>)")
    for flag, kind, what in (("--steps", int, "optimizer steps"), ("--batch", int, "effective (global) batch in samples"),
                             ("--micro-batch", int, "samples per rank per forward"), ("--lr", float, "peak lr"),
                             ("--projector-lr", float, "peak lr of the fresh parts (projector, image tags, skip token)"),
                             ("--max-len", int, "positions per sample, image block included")):
        p.add_argument(flag, type=kind, default=None, help=f"{what} (default: the size's recipe, below)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first of them this machine has)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights and activations; auto: bf16 on a GPU and on CPUs with bf16 matmul instructions "
                        "(AVX-512-BF16, AMX), fp32 elsewhere; chosen once per run. Master weights and AdamW stay fp32")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (the paper sizes); CPU sizes use the base's")
    p.add_argument("--init", default=None, help="a sphinx-x checkpoint (or a released SPHINX-X directory) to start from")
    p.add_argument("--base", default=None,
                   help="pretrained LLM + encoders (tools/pretrain.py) for a CPU size; default base/tiny.safetensors")
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
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between held-out evaluations during training (per-task accuracy on the first "
                        "--eval-subset held-out samples of each task, image reliance) into metrics.jsonl; 0: only at the end")
    p.add_argument("--eval-subset", type=int, default=10, help="held-out samples per task for --eval-every")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the --init checkpoint (held-out accuracy, baseline, image reliance) and exit")
    p.add_argument("--aux-weight", type=float, default=0.01, help="MoE load-balancing loss weight")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--bucket-mb", type=float, default=32.0, help="ZeRO-2 bucket size")
    p.add_argument("--bad-input", choices=("error", "skip"), default="error")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-rank peak for the MFU on the progress line")
    p.add_argument("--stop-after", type=int, default=None, help="stop (as if killed) after this many steps")
    args = p.parse_args(argv)
    if args.size not in SIZES:
        p.error(f"unknown size {args.size!r}; known: {', '.join(SIZES)}")
    args = resolved(args)
    problem = check_args(args)
    if problem:
        p.error(problem)
    return args


def resolved(args) -> argparse.Namespace:
    """The flags with the size's recipe, the default device, the shipped base and the run directory filled in."""
    given = dict(vars(args))
    filled = {k: v for k, v in recipe_of(args.size).items() if given.get(k) is None}
    base = args.base or (str(DEFAULT_BASE) if args.size.startswith("tiny") and not (args.from_scratch or args.init)
                         else None)
    return argparse.Namespace(**{**given, **filled, "device": args.device or default_device(), "base": base,
                                 "out": Path(args.out or f"out/{args.size}")})


def check_args(args) -> str | None:
    """The first thing wrong with the flags, as one line, or None."""
    if args.device not in ("cpu", "cuda", "mps"):
        return f"--device must be cpu, cuda or mps, not {args.device!r} (the rank picks its GPU from LOCAL_RANK)"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: this machine has no CUDA GPU"
    if args.device == "mps" and not torch.backends.mps.is_available():
        return "--device mps: this machine has no Apple GPU (MPS) available"
    if args.base and not Path(args.base).exists():
        return f"no base at {args.base}; make it with `python -m tools.pretrain` or pass --from-scratch"
    parts = [k for k in ("llm", "convnext", "dinov2") if getattr(args, k)]
    if parts and len(parts) < 3:
        return ("the paper's start needs all of --llm, --convnext and --dinov2 (missing: "
                f"{', '.join('--' + k for k in ('llm', 'convnext', 'dinov2') if not getattr(args, k))})")
    if args.eval_only and not (args.init and Path(args.init).is_file()):
        return "--eval-only evaluates a checkpoint of ours: give it as --init model.safetensors"
    if not args.steps and args.data == "synthetic" and not args.eval_only:
        why = "--steps 0 means 'from --epochs', which" if args.steps == 0 else "--size " + args.size + ":"
        return f"{why} needs --data mixture.json (the synthetic data has no epochs); give --steps N > 0"
    for name, ok, want in (("steps", args.steps >= 0, ">= 0 (0: from --epochs)"), ("batch", args.batch > 0, "> 0"),
                           ("micro-batch", args.micro_batch > 0, "> 0"), ("log-every", args.log_every > 0, "> 0"),
                           ("lr", args.lr > 0, "> 0"), ("projector-lr", (args.projector_lr or 1) > 0, "> 0"),
                           ("ckpt-every", args.ckpt_every >= 0, ">= 0"), ("max-len", args.max_len > 0, "> 0"),
                           ("eval-per-task", args.eval_per_task >= 0, ">= 0"), ("epochs", args.epochs > 0, "> 0"),
                           ("tasks-per-image", args.tasks_per_image > 0, "> 0"), ("tp", args.tp > 0, "> 0"),
                           ("eval-every", args.eval_every >= 0, ">= 0"), ("eval-subset", args.eval_subset > 0, "> 0")):
        if not ok:
            return f"--{name} must be {want}, not {getattr(args, name.replace('-', '_'))}"
    return None


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up over the first warmup_frac of the steps, then cosine to 0 (paper Sec. 4.1)."""
    warm = max(1, round(warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


# ----------------------------------------------------------------------------- model and tokenizer

def build_model(args, mesh: Mesh, cfg: SphinxConfig, dtype: str) -> Sphinx:
    """Every rank builds the same model from the seed. Loaded from files (a checkpoint, a released
    directory, pretrained parts), each rank builds on the meta device and reads only its TP shard; a CPU
    size from its base (or from scratch) is built whole with its random fresh parts, then cut, so that
    any TP computes what one process does."""
    torch.manual_seed(args.seed)
    tp = mesh.tp_group
    if (args.init and Path(args.init).is_dir()) or args.llm:
        from formats import outside     # the wing, only when handed an outside format
        model = outside.load_start(args, cfg, tp)
    elif args.init:
        check_spread(mesh, [lambda: verify_safetensors(args.init)])
        model = loading.load_sphinx(args.init, tp_group=tp, verify=False)
    else:
        model = loading.load_base(args.base, cfg) if args.base else build_sphinx(cfg)
        if tp is not None:
            full, model = model, build_sphinx(model.cfg, init=False, tp_group=tp)
            load_state_strict(model, unique_state_dict(full).items(), shard=loading.tp_loading(tp)[1])
            model.mov.freeze_encoders()
    model.to(torch.device(args.device), DTYPES[dtype])
    model.llm.activation_checkpointing = args.activation_checkpointing
    return model.train()


def tokenizer_corpus(seed: int, canvas: int, n: int = 4000):
    return [data.prompt_text(s.turns + [("", None)]) for s in world.train_samples(seed, n, canvas)]


def given_tokenizer(args) -> Path | None:
    """The tokenizer a run must use: --tokenizer, the base's, or the one beside an --init checkpoint of ours
    (a freshly trained one would number the tokens differently: garbage, silently)."""
    if args.tokenizer or args.base:
        return Path(args.tokenizer or Path(args.base).parent / "tokenizer.json")
    if args.init and Path(args.init).is_file():
        found = loading.tokenizer_beside(args.init)
        if found is None:
            raise RunError(f"--init {args.init}: no tokenizer.json in its run directory; pass the one it was "
                           "trained with as --tokenizer")
        return found
    return None


def get_tokenizer(args, mesh, cfg) -> data.Tokenizer:
    """A tokenizer.json always ends up in the run directory, for sample.py. From scratch, a CPU size trains
    a byte-level BPE on the synthetic corpus (rank 0 trains it, the others read it)."""
    path, given = args.out / "tokenizer.json", given_tokenizer(args)
    if given:
        if not given.exists():
            raise RunError(f"no tokenizer at {given}")
        if mesh.is_main and given.suffix == ".json" and given.resolve() != path.resolve():
            shutil.copyfile(given, path)
        barrier(mesh)
        return data.Tokenizer(given)
    if not path.exists():
        if not args.size.startswith("tiny"):
            raise RunError(f"--size {args.size} needs --tokenizer (its LLM's tokenizer.model or tokenizer.json)")
        if mesh.is_main:
            data.train_tokenizer(tokenizer_corpus(args.seed, cfg.canvas), cfg.llm.vocab_size, path)
        barrier(mesh)
    tok = data.Tokenizer(path)
    if tok.vocab_size > cfg.llm.vocab_size:
        raise RunError(f"tokenizer has {tok.vocab_size} tokens but the model only {cfg.llm.vocab_size}")
    return tok


# ----------------------------------------------------------------------------- evaluation

def answer(model, tok, prompt: list[int], tiles, max_new_tokens: int = 48) -> str:
    """The greedy answer to a prompt (ids ending with the template's "### Assistant:")."""
    ids = list(generate(model, prompt, tiles, max_new_tokens, stop_ids=(tok.eos_id,), stop_text="\n" + data.SEP,
                        decode=tok.decode))
    return tok.decode(ids).removesuffix("\n" + data.SEP).strip()


def evaluate(model, tok, mesh, samples, prompt_of=None, log=print, answers: list | None = None) -> dict:
    """Held-out accuracy per task (greedy; box tasks: every box at IoU >= 0.5), split over DP ranks.
    prompt_of(sample) -> (ids, tiles) poses the question; default: the picture and the chat template
    (the base stage passes the scene written as text). Returns {task: (right, n)}; `answers`, if given,
    receives this rank's answers, one dict per question."""
    totals = torch.zeros(len(world.TASKS), 2, dtype=torch.float64)
    mine = [s for i, s in enumerate(samples) if i % mesh.dp == mesh.dp_rank]
    t0, every = time.perf_counter(), max(1, len(mine) // 4)         # a progress line per quarter
    for i, s in enumerate(mine):
        held = data.Sample(s.turns[:-1] + [(s.turns[-1][0], None)], s.task, image=s.image, truth=s.truth)
        ids, tiles = prompt_of(held) if prompt_of else (data.prompt_tokens(tok, held.turns),
                                                        model.layout.tile(s.image) if s.image is not None else None)
        k = world.TASKS.index(s.task)
        said = answer(model, tok, ids, tiles)
        right = world.score(s.task, said, s.turns[-1][1])
        totals[k] += torch.tensor([right, 1.0])
        if answers is not None:
            answers.append({"task": s.task, "sample": s.source, "question": s.turns[-1][0],
                            "reference": s.turns[-1][1], "answer": said, "right": right})
        if (i + 1) % every == 0 or i + 1 == len(mine):
            log(f"  evaluating: {i + 1}/{len(mine)} answers ({time.perf_counter() - t0:.0f} s)")
    all_reduce(totals, mesh.dp_group)
    return {t: (totals[k, 0].item(), totals[k, 1].item()) for k, t in enumerate(world.TASKS)}


def image_reliance(model, tok, mesh, samples) -> tuple[float, float]:
    """Mean answer loss on held-out image samples with their own image, and with the image of
    another held-out sample of the same layout (same skip pattern, so the sequence is unchanged).
    Equal losses mean the model answers from the text alone."""
    enc = [data.encode(s, tok, 10 ** 9, model.layout) for s in samples if s.image is not None]
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
            b = data.collate([e], tok)
            for k, tiles in enumerate((e.tiles, enc[other[i]].tiles)):
                sums[k] += model(b["tokens"].to(dev), [tiles], b["targets"].to(dev), loss_sum=True)[1].item()
            sums[2] += b["n_targets"]
    all_reduce(sums, mesh.dp_group)
    n = max(sums[2].item(), 1)
    return sums[0].item() / n, sums[1].item() / n


def accuracy(scores: dict) -> dict:
    """{task: (right, n)} -> {task: right / n} over the tasks that had samples."""
    return {t: right / n for t, (right, n) in scores.items() if n}


def reliance_ratio(own: float, other: float) -> float:
    """Answer loss with the sample's own image over that with another's: 1 means the image is ignored."""
    return own / max(other, 1e-9)


def interim_eval(args, mesh, model, tok) -> dict:
    """The fixed held-out subset scored during training: per-task accuracy and the image-reliance ratio."""
    held_out = world.eval_per_task(args.seed, args.eval_subset, model.cfg.canvas)
    quiet = lambda *a: None
    scores = evaluate(model, tok, mesh, held_out, log=quiet)
    own, other = image_reliance(model, tok, mesh, held_out)
    return {"eval": accuracy(scores), "reliance": reliance_ratio(own, other)}


def final_report(args, mesh, model, tok, log) -> dict:
    """Held-out accuracy per task beside the text-only baseline, image reliance, expert usage."""
    canvas, is_moe = model.cfg.canvas, model.cfg.llm.n_experts > 0
    if is_moe:
        track_usage(model)
    held_out = world.eval_per_task(args.seed, args.eval_per_task, canvas)
    log(f"held-out evaluation: {len(held_out)} samples over {mesh.dp} rank(s)")
    answers = []
    scores = evaluate(model, tok, mesh, held_out, log=log, answers=answers)
    order = {s.source: i for i, s in enumerate(held_out)}
    answers = sorted(gather_lists(answers, mesh.dp_group), key=lambda a: order[a["sample"]])
    # The floor to beat: each question answered from synthetic training samples' text alone.
    blind = world.text_only_baseline(
        world.train_samples(args.seed, BASELINE_SAMPLES, canvas, args.tasks_per_image), held_out)
    log(f"held-out accuracy (greedy; box tasks: every box at IoU >= 0.5; text-only baseline: each question's "
        f"most common answer in {BASELINE_SAMPLES:,} training samples, image unseen):")
    for task, (right, n) in scores.items():
        if n:
            log(f"  {task:10s} {right / n:6.1%}  ({int(right)}/{int(n)}; text-only baseline {blind[task][0] / n:.1%})")
    own, other = image_reliance(model, tok, mesh, held_out)
    log(f"image reliance: held-out answer loss {own:.3f} with each sample's own image, {other:.3f} with "
        f"another sample's image (ratio {reliance_ratio(own, other):.2f}; 1 means the answers ignore the image)")
    for line in wrong_answers(answers):
        log(line)
    if is_moe:
        log("expert usage during evaluation:\n" + usage_report(model))
    return {"eval": scores, "text_only_baseline": blind, "image_reliance": (own, other), "answers": answers}


def wrong_answers(answers: list[dict]) -> list[str]:
    """Lines showing the first wrong held-out answer of each task: what a number cannot say (a box of the
    right size in the wrong place, a colour mixed up)."""
    wrong = {}
    for a in answers:
        if not a["right"]:
            wrong.setdefault(a["task"], a)
    short = lambda q: q if len(q) <= 60 else "..." + q[-57:]
    return (["what it says when it is wrong (the first wrong held-out answer per task):"] if wrong else []) + \
        [f"  {t:10s} {short(wrong[t]['question'])!r} -> {wrong[t]['answer']!r} (right: {wrong[t]['reference']!r})"
         for t in world.TASKS if t in wrong]


# ----------------------------------------------------------------------------- one step

def micro_step(model, b, n_targets: float, aux_scale: float, dev) -> torch.Tensor:
    """Forward and backward of one micro-batch; its summed answer loss. The gradient is of the global
    batch's mean answer loss (n_targets: the answer tokens of the whole global batch)."""
    _, loss = model(b["tokens"].to(dev), b["images"], b["targets"].to(dev), loss_sum=True, loss_only=True)
    total = loss / max(n_targets, 1)
    if aux_scale:
        total = total + aux_scale * total_aux_loss(model)
    total.backward()
    return loss.detach()


def train_step(model, opt: ZeRO2, micro: list[dict], mesh, lr: float, args, aux_scale: float) -> dict | None:
    """One optimizer step over a global batch (its micro-batches accumulated); None if every sample of the
    batch was skipped (--bad-input skip). ZeRO-2 reduce-scatters each gradient bucket as backward completes it."""
    n_targets = agree(mesh.dp_group, sum(b["n_targets"] for b in micro))
    if n_targets == 0:
        return None
    dev = model.skip_token.device
    loss_sum, tokens = torch.zeros((), device=dev), 0
    for b in micro:
        if b["n_samples"]:                      # a micro-batch whose samples were all skipped only joins the reduction
            loss_sum += micro_step(model, b, n_targets, aux_scale, dev)
            tokens += b["n_tokens"]
        opt.reduce_gradients()
    grad_norm = opt.step(lr, args.grad_clip)
    loss = all_reduce(loss_sum, mesh.dp_group).item() / n_targets
    return {"loss": loss, "grad_norm": grad_norm, "tokens": tokens * mesh.dp}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_token(model, opt: ZeRO2, b: dict) -> float:
    """FLOPs per position of a forward + backward, counted once on a throw-away pass (a dispatch mode may
    change kernels, so the real steps never run under it: resumed runs stay bit-identical)."""
    dev = model.skip_token.device
    with opt.hooks_paused():
        micro_step(model, b, 1.0, 0.0, dev)   # MoE layers time their expert paths on a new shape: not counted
        flops = count_flops(lambda: micro_step(model, b, 1.0, 0.0, dev))
    model.zero_grad(set_to_none=True)
    return flops / max(b["n_tokens"], 1)


class Progress:
    """The progress line and metrics.jsonl: step, smoothed loss, lr, tokens/s, MFU when a peak is given,
    elapsed time and ETA."""

    def __init__(self, args, mesh, step0: int, log):
        self.args, self.mesh, self.log, self.step0 = args, mesh, log, step0
        self.t_start = self.t0 = time.perf_counter()
        self.tokens, self.smooth, self.flops_per_token = 0, None, None
        self.metrics = open(args.out / "metrics.jsonl", "a") if mesh.is_main else None

    def record(self, row: dict):
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def evaluated(self, step: int, result: dict):
        """An interim evaluation: one line, and a row of metrics.jsonl (timed on the run's clock)."""
        self.log(f"step {step:5d} held-out (first {self.args.eval_subset} per task): " +
                 " ".join(f"{t} {a:.0%}" for t, a in result["eval"].items()) + f" | reliance {result['reliance']:.2f}")
        self.record({"step": step, "elapsed_s": time.perf_counter() - self.t_start, **result})

    def update(self, step: int, steps: int, lr: float, out: dict):
        self.tokens += out["tokens"]
        self.smooth = out["loss"] if self.smooth is None else 0.9 * self.smooth + 0.1 * out["loss"]
        if step % self.args.log_every and step != steps:
            return
        now = time.perf_counter()
        tps, elapsed = self.tokens / (now - self.t0), now - self.t_start
        eta = elapsed / (step - self.step0) * (steps - step)
        mfu = (self.flops_per_token or 0) * tps / (self.args.peak_tflops * 1e12) if self.args.peak_tflops else None
        self.log(f"step {step:5d}/{steps} | loss {self.smooth:.4f} (this step {out['loss']:.4f}) | lr {lr:.2e} | "
                 f"grad norm {out['grad_norm']:.2f} | {tps:,.0f} tokens/s" + (f" | MFU {mfu:.1%}" if mfu else "") +
                 f" | {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
        self.record({"step": step, "loss": out["loss"], "loss_smooth": self.smooth, "lr": lr,
                     "grad_norm": out["grad_norm"], "tokens_per_s": tps, "elapsed_s": elapsed, **({"mfu": mfu} if mfu else {})})
        self.t0, self.tokens = now, 0


# ----------------------------------------------------------------------------- the run

def total_steps(args, source, log) -> int:
    """--steps, or the paper's length: epochs over the records at this batch (Sec. 4.1 trains one)."""
    if args.steps:
        return args.steps
    records = sum(len(d) for d in source.datasets if d != "synthetic")
    steps = max(1, math.ceil(args.epochs * records / args.batch))
    log(f"{args.epochs:g} epoch(s) of {records:,} records at batch {args.batch} = {steps:,} steps")
    return steps


def make_data(args, mesh, cfg, tok, layout, log):
    """The sample stream (synthetic or a mixture), its batcher, the run's length and the accumulation."""
    if args.batch % (args.micro_batch * mesh.dp):
        raise RunError(f"--batch {args.batch} must be a multiple of micro-batch {args.micro_batch} x DP {mesh.dp}")
    skips = data.Skips(args.bad_input)
    entries = ([{"path": "synthetic", "ratio": 1.0, "tasks_per_image": args.tasks_per_image}] if args.data == "synthetic"
               else data.read_mixture(args.data))
    source = data.SampleSource(entries, args.seed, cfg.canvas, skips=skips, synthetic=world.synthetic_sample)
    # The batcher's unit is the whole global batch, so its composition does not depend on DP or accumulation.
    batcher = data.Batcher(source, tok, layout, args.max_len, args.batch, rank=mesh.dp_rank, world=mesh.dp)
    return skips, batcher, total_steps(args, source, log), args.batch // (args.micro_batch * mesh.dp)


def finish(args, mesh, model, tok, opt, batcher, step, losses, progress, skips, log, t_run: float) -> dict:
    """The end of a run: the last checkpoint, the held-out report (also a row of metrics.jsonl), run.png, and
    the wall time since the run began (t_run)."""
    save_checkpoint(args, mesh, model, opt, batcher, step, losses)
    log(f"saved {args.out / 'model.safetensors'} (and {args.out / 'tokenizer.json'}) after "
        f"{(time.perf_counter() - progress.t_start) / 60:.1f} min")
    if skips.reasons:
        log(skips.report())
    result = {"losses": losses, "mesh": mesh, "model": model, "opt": opt}
    if args.eval_per_task:
        result.update(final_report(args, mesh, model, tok, log))
        progress.record({"step": step, "elapsed_s": time.perf_counter() - progress.t_start, "final": True,
                         "eval": accuracy(result["eval"]), "reliance": reliance_ratio(*result["image_reliance"])})
        if mesh.is_main:
            atomic_write(args.out / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in result["answers"]))
            log(f"every held-out answer: {args.out / 'answers.jsonl'}")
    if mesh.is_main:
        picture = draw_run(args.out / "metrics.jsonl", args.out / "run.png")
        log(f"picture of the run: {picture}")
    log(f"wall time {(time.perf_counter() - t_run) / 60:.1f} min (built, trained, saved, evaluated)")
    return result


def train(args) -> dict:
    mesh = setup_mesh(args.tp, args.device)
    log = (lambda *a: print(*a, flush=True)) if mesh.is_main else (lambda *a: None)
    lock, refusal = None, None
    if mesh.is_main:
        try:
            lock = claim_run_dir(args)
        except RunError as e:
            refusal = str(e)
    # Every rank learns the main rank's verdict, so a refused run ends everywhere instead of hanging.
    if agree(mesh.world_group, refusal is not None):
        raise RunError(refusal or f"{args.out}: refused by rank 0 (see its message)")
    try:
        return run(args, mesh, log)
    finally:
        if lock:
            lock.unlink(missing_ok=True)


def run(args, mesh, log) -> dict:
    t_run = time.perf_counter()
    dtype, why = run_dtype(args, mesh)            # chosen once per run, recorded, reused by a resume
    cfg = sphinx_config(args.size)
    tok = get_tokenizer(args, mesh, cfg)
    model = build_model(args, mesh, cfg, dtype)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fresh_scale = (args.projector_lr or args.lr) / args.lr
    opt = ZeRO2(trainable, mesh, args.lr, bucket_numel=int(args.bucket_mb * 2 ** 20 / 4),
                lr_scale=lambda name: 1.0 if name.startswith("llm.") else fresh_scale)
    skips, batcher, steps, accum = make_data(args, mesh, cfg, tok, model.layout, log)
    step, losses = load_checkpoint(args, mesh, model, opt, batcher) if args.resume else (0, [])
    if args.resume:
        log(f"resumed from step {step}")
    # The load-balancing loss, averaged over layers, micro-batches and DP ranks; /tp: the router's
    # gradient is summed over TP (parallel.partial_grad).
    aux_scale = args.aux_weight / (accum * mesh.dp * mesh.tp) if cfg.llm.n_experts else 0.0
    log(f"SPHINX-X {args.size}: {sum(p.numel() for _, p in trainable):,} trainable + "
        f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen parameters; DP {mesh.dp} x "
        f"TP {mesh.tp}; batch {args.batch} = {args.micro_batch} x {accum} accumulation x {mesh.dp} DP; per rank: "
        f"weights {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB, grad + optimizer "
        f"shards {opt.state_bytes() / 2**20:.0f} MiB; lr {args.lr:g}"
        f"{f' (projector {args.projector_lr:g})' if args.projector_lr else ''}, {steps} steps; {dtype} ({why})")
    progress, empty = Progress(args, mesh, step, log), 0
    while step < steps:
        lr = lr_at(step, steps, args.lr, args.warmup)
        micro = batcher.next_micro(accum)
        if args.peak_tflops and progress.flops_per_token is None and micro[0]["n_samples"]:
            progress.flops_per_token = flops_per_token(model, opt, micro[0])
        out = train_step(model, opt, micro, mesh, lr, args, aux_scale)
        if out is None:             # all skipped: draw the next batch, but never loop forever over bad data
            empty += 1
            if empty == MAX_EMPTY_BATCHES:
                raise RunError(f"{MAX_EMPTY_BATCHES} global batches in a row had no usable sample; the data looks "
                               f"unusable. {skips.report()}")
            continue
        empty, step = 0, step + 1
        losses.append(out["loss"])
        progress.update(step, steps, lr, out)
        if args.eval_every and (step % args.eval_every == 0 or step == steps):
            progress.evaluated(step, interim_eval(args, mesh, model, tok))
            model.train()
        if args.ckpt_every and step % args.ckpt_every == 0 and step < steps:
            save_checkpoint(args, mesh, model, opt, batcher, step, losses)
        if args.stop_after and step >= args.stop_after:
            log(f"stopping after step {step} (--stop-after)")
            return {"losses": losses, "mesh": mesh, "model": model, "opt": opt}
    return finish(args, mesh, model, tok, opt, batcher, step, losses, progress, skips, log, t_run)


def interrupted_line(args) -> str:
    latest = args.out / "latest"
    last = (f"the last good checkpoint is {args.out / latest.read_text().strip()}, continue it with the same command "
            "plus --resume") if latest.exists() else "no checkpoint was written yet; the run starts over with --overwrite"
    return f"\ninterrupted; {last}"


def evaluate_checkpoint(args) -> dict:
    """--eval-only: the end-of-run report for any checkpoint of ours, on this process's mesh; writes nothing."""
    mesh = setup_mesh(args.tp, args.device)
    log = (lambda *a: print(*a, flush=True)) if mesh.is_main else (lambda *a: None)
    tok = data.Tokenizer(given_tokenizer(args))
    model = loading.load_sphinx(args.init, tp_group=mesh.tp_group).to(torch.device(args.device))
    log(f"evaluating {args.init}")
    return final_report(args, mesh, model.eval(), tok, log)


def main(argv=None):
    args = parse_args(argv)
    try:
        evaluate_checkpoint(args) if args.eval_only else train(args)
    except KeyboardInterrupt:                  # Ctrl-C: one line from the main rank, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_line(args), file=sys.stderr)
        sys.exit(130)
    except (CheckpointError, data.DataError, ValueError, FileNotFoundError) as e:   # RunError is a ValueError
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
