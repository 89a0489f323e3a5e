"""A run directory: claimed by one live run, checkpoints written atomically with a digest per file,
resumed exactly (or refused, naming what changed or broke), and the digest checks spread over the ranks.

    out/<size>/  lock  latest  model.safetensors  tokenizer.json  metrics.jsonl  step-000200/ ...
    step-N/      model.safetensors (full weights)  optim-tp<t>-dp<d>.pt (each rank's ZeRO-2 shard)  state.json
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import data as D
import loading as L
import model as M
from checkpoint import (CheckpointError, file_sha256, iter_safetensors, load_state_strict, read_safetensors_metadata,
                        unique_state_dict)
from parallel import agree, barrier, unshard
from zero import ZeRO2


def check_spread(mesh, checks: list):
    """Checks that read whole files (digests), spread over the ranks: each file is read once per run, not
    once per rank (64 ranks resuming a 13B run would otherwise read its ~180 GB checkpoint 64 times). A
    failure anywhere stops every rank with the same one-line error: all learn the first failing check's
    index (one all-reduce, so no rank is left waiting in a collective) and re-run that check themselves."""
    first = len(checks)
    for i in range(mesh.rank, len(checks), mesh.world):
        try:
            checks[i]()
        except (CheckpointError, OSError):                  # an unreadable file too: no rank may leave alone
            first = i
            break
    first = int(agree(mesh.world_group, first, "min"))
    if first < len(checks):
        checks[first]()
        raise CheckpointError(f"check {first} failed on another rank but passes here (a file changing?)")


def consolidated_state(model, mesh) -> dict:
    """Full weights with TP shards merged (every rank takes part in the all-gathers)."""
    return {n: unshard(n, t, mesh.tp_group) for n, t in unique_state_dict(model).items()}


def save_checkpoint(args, mesh, model, opt: ZeRO2, batcher: D.Batcher, step: int, losses):
    """Everything goes into a fresh directory that is renamed into place only when complete, and
    `latest` is replaced atomically: a crash mid-save leaves the previous checkpoint as it was."""
    final = args.out / f"step-{step:06d}"
    tmp = args.out / f".tmp-step-{step:06d}"
    if mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(mesh)
    state = consolidated_state(model, mesh)
    failed = None
    try:
        if mesh.is_main:
            L.save_sphinx(tmp / "model.safetensors", model_with_state(model, state))
        torch.save(opt.state_dict(), tmp / f"optim-tp{mesh.tp_rank}-dp{mesh.dp_rank}.pt")     # every rank its shard
    except (OSError, RuntimeError) as e:   # a full disk: every rank must hear of it, or the others hang
        full = shutil.disk_usage(args.out).free < 64 << 20
        failed = e if isinstance(e, OSError) else OSError(errno.ENOSPC if full else errno.EIO, str(e), str(tmp))
    if agree(mesh.world_group, failed is not None):
        if mesh.is_main:
            shutil.rmtree(tmp, ignore_errors=True)      # the previous checkpoint stays the latest
        raise failed or OSError(errno.EIO, "another rank failed to write its part of the checkpoint", str(tmp))
    if mesh.is_main:
        # A checksum per file: flipped bytes in a weight or an optimizer shard are refused at resume.
        meta = {"step": step, "size": args.size, "dp": mesh.dp, "tp": mesh.tp, "data": batcher.state_dict(),
                "losses": losses, "rng": torch.get_rng_state().tolist(), "settings": run_settings(args),
                "sha256": {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}}
        (tmp / "state.json").write_text(json.dumps(meta))
        k = 1
        while final.exists():              # the same step saved again: a new name, the old one intact
            final, k = args.out / f"step-{step:06d}.{k}", k + 1
        os.replace(tmp, final)
        atomic_write(args.out / "latest", final.name)
        shutil.copyfile(final / "model.safetensors", args.out / ".model.safetensors.tmp")
        os.replace(args.out / ".model.safetensors.tmp", args.out / "model.safetensors")   # what sample.py loads
        for old in checkpoints(args.out)[:-2]:                                             # keep the last two
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(mesh)


# What a resume must keep for it to continue the same run (it refuses otherwise, naming them).
RESUME_SETTINGS = ("size", "batch", "micro_batch", "steps", "lr", "projector_lr", "seed", "max_len", "data", "tp",
                   "tasks_per_image", "warmup", "grad_clip", "aux_weight", "dtype")


def run_settings(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in ((k, getattr(args, k)) for k in RESUME_SETTINGS)}


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first by (step, save)."""
    def order(p):
        step, _, again = p.name.removeprefix("step-").partition(".")
        return int(step), int(again or 0)
    return sorted((p for p in out.glob("step-*") if re.fullmatch(r"step-\d+(\.\d+)?", p.name)), key=order)


class RunError(ValueError):
    """A run that cannot start or go on as asked: one line for the user."""


def run_dtype(args, mesh) -> tuple[str, str]:
    """The run's precision, chosen once: a fresh run resolves --dtype on the main rank (model.pick_dtype: from
    the device and the CPU's instructions, never a timing), every rank takes that choice, and run.json in
    the run directory records it; a resume reads it back, so it trains on in the precision it started in."""
    path = args.out / "run.json"
    if args.resume and path.exists():
        rec = json.loads(path.read_text())
        return rec["dtype"], f"{rec['why']}; recorded when the run started"
    dtype, why = M.pick_dtype(args.dtype, args.device) if mesh.is_main else ("fp32", "")
    if agree(mesh.world_group, dtype == "bf16"):          # the main rank's choice, on every rank
        dtype, why = "bf16", why or "the main rank's choice"
    if mesh.is_main:
        atomic_write(path, json.dumps({"dtype": dtype, "why": why, "asked": args.dtype}))
    barrier(mesh)
    return dtype, why


def claim_run_dir(args) -> Path:
    """Refuse to clobber a run: an existing run needs --resume or --overwrite, and a run directory
    another live process has claimed is refused. The claim is a `lock` file holding the pid."""
    if args.out.exists() and not args.out.is_dir():
        raise RunError(f"--out {args.out} is a file, not a directory")
    args.out.mkdir(parents=True, exist_ok=True)
    lock = args.out / "lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = int(lock.read_text().strip() or 0)
        if pid and _alive(pid):
            raise RunError(f"{args.out} is in use by another run (pid {pid}); wait for it or use another --out") from None
        lock.unlink()                                                       # a dead run's claim
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    held = (args.out / "latest").exists() or (args.out / "model.safetensors").exists()
    if held and not args.resume:
        if not args.overwrite:
            lock.unlink()
            raise RunError(f"{args.out} already holds a run; pass --resume to continue it or --overwrite to "
                           "start over (which deletes its checkpoints)")
        for old in checkpoints(args.out):
            shutil.rmtree(old)
    if not args.resume:         # a fresh run never mixes with another's files (one that died before its checkpoint)
        for name in ("latest", "model.safetensors", "metrics.jsonl", "run.json"):
            (args.out / name).unlink(missing_ok=True)
    return lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def model_with_state(model, state):
    """A full (un-sharded) Sphinx holding `state`, for saving."""
    if model.llm.tp_group is None:
        return model
    full = M.build_sphinx(model.cfg, init=False)
    return load_state_strict(full, state.items())


def atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(args, mesh, model, opt: ZeRO2, batcher: D.Batcher):
    latest = args.out / "latest"
    if not latest.exists():
        raise CheckpointError(f"{args.out}: no checkpoint to resume from (no 'latest' file)")
    ckpt = args.out / latest.read_text().strip()
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        step, dp, tp, losses, rng = meta["step"], meta["dp"], meta["tp"], meta["losses"], meta["rng"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: unreadable or incomplete ({type(e).__name__}: {e})") from None
    if tp != mesh.tp:
        raise CheckpointError(f"{ckpt}: saved with TP {tp}, resuming needs the same TP (got {mesh.tp})")
    now = run_settings(args)
    changed = [f"--{k.replace('_', '-')} {old} -> {now.get(k)}" for k, old in meta.get("settings", {}).items()
               if now.get(k) != old]
    if changed:
        raise CheckpointError(f"{ckpt}: resuming with other settings than the run's ({'; '.join(changed)}); "
                              "resume with the run's flags, or start a new run")
    def check(name, digest):
        def run():
            if not (ckpt / name).exists():
                raise CheckpointError(f"{ckpt / name}: missing")
            if file_sha256(ckpt / name) != digest:
                raise CheckpointError(f"{ckpt / name}: checksum mismatch, the file changed after it was saved")
        return run
    check_spread(mesh, [check(n, d) for n, d in sorted(meta.get("sha256", {}).items())])
    path = ckpt / "model.safetensors"
    if read_safetensors_metadata(path).get("format") != "sphinx-x":
        raise CheckpointError(f"{path}: not a sphinx-x checkpoint")
    # Copied in place, not load_state_strict (which assigns new tensors): the trainable parameters are
    # views into ZeRO-2's flat buckets, and replacing them would cut them loose from the optimizer.
    own = dict(model.named_parameters())
    with torch.no_grad():
        loaded = set()
        for n, t in iter_safetensors([path], L.tp_loading(mesh.tp_group)[0]):     # only this rank's slices
            if n in own:
                if own[n].shape != t.shape:
                    raise CheckpointError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(own[n].shape)}")
                own[n].copy_(t)
                loaded.add(n)
        if loaded != set(own):
            raise CheckpointError(f"{path}: missing {sorted(set(own) - loaded)[:10]}")
    shards = []
    for d in range(dp):
        f = ckpt / f"optim-tp{mesh.tp_rank}-dp{d}.pt"
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:   # a truncated or missing file: torch raises many error types
            raise CheckpointError(f"{f}: unreadable optimizer shard ({type(e).__name__}: {e})") from None
    opt.load_shards(shards)
    batcher.load_state_dict(meta["data"])
    torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
    if mesh.is_main and (args.out / "metrics.jsonl").exists():      # drop the lines of steps after the checkpoint
        lines = (args.out / "metrics.jsonl").read_text().splitlines()
        atomic_write(args.out / "metrics.jsonl", "".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
    return step, losses


# ----------------------------------------------------------------------------- the run's picture

TASK_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (0, 0, 0)]


def _panel(draw, box, series, x_max, y_max, title, x_label):
    """One line chart in `box` (x0, y0, x1, y1): series = [(label, colour, [(x, y), ...])]. Returns the
    (x, y) -> pixel map, for marks drawn on top."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 14), title, fill=(0, 0, 0))
    draw.text((x1 - 6 * len(x_label), y1 + 16), x_label, fill=(0, 0, 0))
    for frac in (0, 0.25, 0.5, 0.75, 1):
        label = f"{round(frac * x_max)}"
        draw.text((x0 + frac * (x1 - x0) - 3 * len(label), y1 + 3), label, fill=(0, 0, 0))
    for frac in (0, 0.5, 1):
        y = y1 - frac * (y1 - y0)
        draw.text((x0 - 34, y - 5), f"{frac * y_max:.2g}", fill=(0, 0, 0))
    px = lambda x, y: (x0 + (x1 - x0) * x / max(x_max, 1e-9), y1 - (y1 - y0) * min(y, y_max) / max(y_max, 1e-9))
    for i, (label, colour, points) in enumerate(series):
        if len(points) > 1:
            draw.line([px(x, y) for x, y in points], fill=colour, width=2)
        elif points:
            (cx, cy), r = px(*points[0]), 3
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        draw.text((x1 + 8, y0 + 14 * i), label, fill=colour)
    return px


def draw_run(metrics: Path, out: Path) -> Path:
    """run.png: the smoothed training loss, and held-out accuracy per task with the image-reliance ratio
    (when the run evaluated), against step; the wall time of the last step is in the title."""
    from PIL import Image, ImageDraw
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    img = Image.new("RGB", (760, 520), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x_max = max([r["step"] for r in rows] or [1])
    minutes = max([r.get("elapsed_s", 0) for r in rows] or [0]) / 60
    draw.text((50, 8), f"{metrics.parent.name}: {x_max} steps, {minutes:.1f} min", fill=(0, 0, 0))
    loss = [(r["step"], r.get("loss_smooth", r["loss"])) for r in steps]
    _panel(draw, (50, 50, 600, 230), [("loss (smoothed)", TASK_COLORS[0], loss)], x_max,
           max([y for _, y in loss] or [1]) * 1.05, "training loss (answer tokens)", "step")
    tasks = sorted({t for r in evals for t in r["eval"]})
    interim = [r for r in evals if not r.get("final")] or evals     # the final 40-per-task score is its own point
    series = [(t, TASK_COLORS[i % 7], [(r["step"], r["eval"][t]) for r in interim if t in r["eval"]])
              for i, t in enumerate(tasks)]
    series.append(("reliance", TASK_COLORS[7], [(r["step"], r["reliance"]) for r in interim]))
    px = _panel(draw, (50, 290, 600, 480), series, x_max, 1.0,
                "held-out accuracy per task; reliance = own / other image answer loss (lower: uses the image)", "step")
    for i, t in enumerate(tasks):                   # the end-of-run evaluation (all held-out samples): a dot per task
        final = next((r["eval"][t] for r in reversed(evals) if r.get("final") and t in r["eval"]), None)
        if final is not None:
            cx, cy = px(x_max, final)
            cx -= 4 * i                             # side by side where several tasks share a score
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=TASK_COLORS[i % 7])
    tmp = out.with_name(out.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, out)
    return out
