"""The tiny base: pretrained parts for the CPU sizes, made the way the paper's parts were made.

    python -m tools.pretrain            # -> base/tiny.safetensors + base/tokenizer.json (~3 h on 2 cores)
    python -m tools.pretrain --reuse-llm base/tiny.safetensors --out base-new   # redo only the encoders
    python -m tools.pretrain --reuse-vision base/tiny.safetensors --llm-loss answers --tasks-per-image 3 \
        --induction-warmup 150 --induction-every 4 --llm-steps 1500 --out base2   # an LLM that copies (docs/results.md)

The defaults remake the shipped base.

SPHINX-X (arXiv 2402.05935, Sec. 3) never trains an LLM or a vision encoder from scratch: it tunes a
pretrained LLM (TinyLlama, InternLM2, LLaMA-2, Mixtral) on top of frozen pretrained encoders
(CLIP-ConvNeXt, DINOv2). A from-scratch tiny model trained for 10 CPU minutes learns only the answer
priors, so the CPU sizes get a base made by this script, one stage per part:

  1. tokenizer  byte-level BPE on the synthetic world's text (the tuning reuses it).
  2. LLM        next-token prediction on the world *as text*: each scene written out in the detection
                answer's words and boxes where the picture will later sit (right after BOS), then a
                conversation about it in the chat template; language-only tasks too. It learns the
                words and the answer formats before it sees a pixel; copying from context needs the
                loss on the answers and induction batches (the LLM-that-copies command above).
  3. ConvNeXt   dense, as a detection backbone is pretrained: linear heads on every grid cell's token
                name what covers the cell (colour, shape, which word) and regress its box; the heads
                are thrown away. (--convnext-objective clip: contrastive view <-> caption, as CLIP.)
  4. ViT        the same dense objective. (--vit-objective mim: masked-image modelling as DINOv2's
                iBOT; clip: contrastive.) The paper's CLIP and DINOv2 learnt from web-scale data what
                images hold; on this world's few thousand scenes, a caption-level or pixel-level
                objective leaves shapes, letters and exact places out of the tokens (the probes below
                measure it), and the dense one puts them in.
     Then each encoder's output channels are standardised (folded into its final LayerNorm).
  5. probes     linear probes of the frozen features (colour, shape and box of what each grid cell
                shows), random init vs pretrained, printed and stored in the file's metadata.
  6. scene tokens  the LLM learns the tasks with each scene given as what the dense objective asks the
                encoders for: per grid cell of every view, the colour, shape, word and box of what
                covers it, in the image block's place and layout (tools/scene_tokens.py). The tuning
                learns no faster from such perfect tokens than from the encoders' (docs/results.md): the
                samples a task needs are the LLM's, and here it spends them without pixels. Then
                (--place-steps; 0 skips it) a second phase in which each cell also carries its box as a place code and
                each view's cells come in a random order, so the LLM must read the place from the value.
  7. projector  fitted by least squares so the encoders' tokens land where the scene tokens are; the
                base ships it with the image tags and the skip token, and the tuning starts from them.
The encoders' stages do not depend on the LLM, and the LLM's initialisation does not depend on the
encoders' shapes, so `--reuse-llm` or `--reuse-vision` give what a full run gives (a reused LLM keeps its
scene-token stage when it had one; the projector is always refitted).

Every stage reads only the training split of the synthetic world (world.py keeps held-out scenes out of it).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import loading
import model
import train
import world
from parallel import Mesh
from tiling import tile
from tools.scene_tokens import (COLOURS, SHAPES, TEXTS, cell_attributes, cell_labels, encode_scene,
                                 fit_projector, scene_grid, scene_model, scene_prompt, shift_boxes, view_contents)

RECIPE = dict(llm_steps=3000, llm_batch=32, llm_lr=2e-3, scene_steps=5000, place_steps=5000, scene_batch=16,
              scene_lr=1e-3, convnext_steps=1600, vit_steps=800, vis_batch=128, vis_lr=2e-3, word_weight=3.0,
              shape_weight=3.0, seed=1000)
# Which recipe entries make which part (a reused part keeps its own in the new base's summary).
VISION_KEYS = ("convnext_steps", "vit_steps", "vis_batch", "vis_lr", "word_weight", "shape_weight", "convnext_objective",
               "vit_objective")
LLM_KEYS = ("llm_steps", "llm_batch", "llm_lr", "llm_loss", "tasks_per_image", "induction_warmup", "induction_every")
SCENE_KEYS = ("scene_steps", "place_steps", "scene_batch", "scene_lr", "scene_text_every")
SCENE_FRESH_LR = 10    # the scene projector, image tags and skip token learn 10x faster (the tuning's projector lr)
SCENE_START = 2_000_000    # the scene stage's samples: past the LLM stage's
SCENE_TEXT_START = 4_000_000   # its text-form batches (--scene-text-every): past both phases' scenes
PLACE_TASKS = 4            # the place phase: up to 4 tasks per scene, so the box tasks get samples and the rest stay
FIT_VIEWS = 4096           # views the projector is fitted on
WARMUP = 0.02          # linear warm-up over the first 2% of each stage's steps, then cosine to 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=[s for s in model.SIZES if s.startswith("tiny")])
    p.add_argument("--out", default="base", help="directory for <size>.safetensors and tokenizer.json")
    for k, v in RECIPE.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast for the LLM stage; auto: bf16 where the CPU has bf16 matmul instructions")
    p.add_argument("--convnext-objective", choices=("clip", "dense"), default="dense",
                   help="ConvNeXt: contrastive with captions (CLIP-like) or dense (name and box what each cell shows)")
    p.add_argument("--vit-objective", choices=("mim", "clip", "dense"), default="dense",
                   help="ViT: masked-image modelling (DINOv2-like), contrastive or dense like the ConvNeXt")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-per-task", type=int, default=40, help="held-out questions per task for the base's evaluations")
    p.add_argument("--overwrite", action="store_true", help="replace an existing base in --out")
    p.add_argument("--llm-loss", choices=("answers", "all"), default="all",
                   help="LLM stage: loss on the answers only, or on every token (scene coordinates included)")
    p.add_argument("--tasks-per-image", type=int, default=1, help="LLM stage: tasks in one conversation about a scene")
    p.add_argument("--llm-start", type=int, default=0, help="LLM stage: index of the first training sample")
    p.add_argument("--induction-warmup", type=int, default=0, help="LLM stage: first steps on induction batches only")
    p.add_argument("--induction-every", type=int, default=0, help="LLM stage: then every N-th step one (0: never)")
    p.add_argument("--scene-text-every", type=int, default=0,
                   help="scene stage: every N-th step a text-form batch as in the LLM stage, so the LLM keeps the "
                        "scene written as text (0: never; the stage alone erases it, docs/results.md)")
    p.add_argument("--reuse-vision", default=None,
                   help="a base whose tokenizer and encoders to keep: redo only the LLM stage")
    p.add_argument("--reuse-llm", default=None,
                   help="a base made with the same LLM recipe: take its tokenizer and LLM, redo only the encoders "
                        "(the LLM stage does not depend on the vision stages)")
    return p.parse_args(argv)


def optimise(name: str, params, steps: int, lr: float, loss_at, batch: int, log, log_every: int,
             betas=(0.9, 0.999), weight_decay=0.0, clip=None) -> list[float]:
    """The loop every stage shares: AdamW, warm-up then cosine, loss_at(step) -> loss, a progress line."""
    params = list(params)
    groups = params if isinstance(params[0], dict) else [{"params": params}]      # a group may carry an lr_scale
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    params = [p for g in opt.param_groups for p in g["params"]]
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, steps, lr, WARMUP) * g.get("lr_scale", 1.0)
        loss = loss_at(step)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            dt, recent = time.perf_counter() - t0, losses[-log_every:]
            log(f"{name:13s} step {step + 1:5d}/{steps} | loss {sum(recent) / len(recent):.4f} | "
                f"{(step + 1) * batch / dt:.0f} samples/s | ETA {dt / (step + 1) * (steps - step - 1) / 60:.1f} min")
    return losses


# ----------------------------------------------------------------------------- 1-2: tokenizer and LLM

def scene_prefix(sample: data.Sample, canvas: int) -> str:
    """The scene in the detection answer's words and boxes, where the image block goes ('' without one)."""
    if sample.image is None:
        return ""
    t = sample.truth
    return world.scene_text(t["objects"], t["word"], sample.image.size, canvas) + ".\n"


def text_form(sample: data.Sample, canvas: int) -> str:
    """A synthetic sample as the LLM base reads it: the scene in words, then the conversation."""
    return scene_prefix(sample, canvas) + data.prompt_text(sample.turns)


def text_prompt(tok: data.Tokenizer, sample: data.Sample, canvas: int) -> list[int]:
    """BOS + the text form of a sample whose last answer is None: a question posed to the LLM base."""
    return [tok.bos_id] + tok.encode(text_form(sample, canvas))


def base_samples(seed: int, start: int, n: int, canvas: int, tasks_per_image: int = 1) -> list[data.Sample]:
    return [world.synthetic_sample(seed, "train", i, canvas, tasks_per_image) for i in range(start, start + n)]


def base_texts(seed: int, start: int, n: int, canvas: int) -> list[str]:
    return [text_form(s, canvas) for s in base_samples(seed, start, n, canvas)]


def lm_batch(tok: data.Tokenizer, samples: list[data.Sample], canvas: int, answers_only: bool = True):
    """BOS + scene text + conversation, right-padded. answers_only: the loss falls on the assistant's answers
    alone, as in the tuning: the scene's random coordinates cannot be predicted, and learning to find the
    right item in the context and copy it is what every task needs. Otherwise on every next token."""
    seqs = [data.tokenize_conversation(tok, s.turns, s.task, prefix=scene_prefix(s, canvas)) for s in samples]
    T = max(len(ids) for ids, _ in seqs)
    x = torch.tensor([ids + [tok.eos_id] * (T - len(ids)) for ids, _ in seqs])
    y = torch.tensor([[t if (keep or not answers_only) else data.IGNORE_INDEX for t, keep in zip(ids[1:], mask[1:])]
                      + [data.IGNORE_INDEX] * (T - len(ids) + 1) for ids, mask in seqs])
    return x, y


def induction_batch(tok: data.Tokenizer, gen: torch.Generator, n: int = 32, length: int = 32):
    """BOS + a random token sequence + the same sequence again; the loss on the repeat. It grows the
    attention heads that find a token's earlier occurrence and copy what followed it (induction heads),
    which every task needs (copy the shape that follows "green" in the scene) and which the world's text
    alone grows slowly (a fresh tiny LLM learns this task in ~100 steps)."""
    r = torch.randint(10, tok.vocab_size, (n, length), generator=gen)
    x = torch.cat([torch.full((n, 1), tok.bos_id), r, r], 1)
    y = torch.full_like(x, data.IGNORE_INDEX)
    y[:, length + 1:-1] = x[:, length + 2:]
    return x, y


def text_batch(tok: data.Tokenizer, args, canvas: int, start: int, answers_only: bool, tasks_per_image: int):
    """lm_batch of llm_batch text-form samples from training sample `start` on."""
    batch = base_samples(args.seed, start, args.llm_batch, canvas, tasks_per_image)
    return lm_batch(tok, batch, canvas, answers_only=answers_only)


def train_llm(llm: model.Transformer, tok, args, canvas: int, autocast: bool, log) -> list[float]:
    gen = torch.Generator().manual_seed(args.seed)

    def loss_at(step):
        if step < args.induction_warmup or (args.induction_every and step % args.induction_every == 0):
            x, y = induction_batch(tok, gen)
        else:
            x, y = text_batch(tok, args, canvas, args.llm_start + step * args.llm_batch, args.llm_loss == "answers",
                              args.tasks_per_image)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return llm(x, targets=y)[1]
    llm.train()
    return optimise("llm", llm.parameters(), args.llm_steps, args.llm_lr, loss_at, args.llm_batch, log,
                    args.log_every, betas=(0.9, 0.95), clip=1.0)


def one_process() -> Mesh:
    """The mesh of this process alone: the base's evaluations run outside torchrun."""
    return Mesh(rank=0, world=1, dp_rank=0, dp=1, tp_rank=0, tp=1)


@torch.no_grad()
def held_out_accuracy(net, tok, seed: int, canvas: int, per_task: int, prompt_of=None, log=print) -> dict:
    """train.evaluate's greedy per-task accuracy, in this one process; prompt_of poses each question."""
    samples = world.eval_per_task(seed, per_task, canvas)
    return train.accuracy(train.evaluate(net, tok, one_process(), samples, prompt_of, log=log))


def eval_text_form(llm, tok, seed: int, canvas: int, per_task: int = 20, log=print) -> dict:
    """Greedy answers to held-out questions with the scene given as text (train.evaluate's scoring): what
    the LLM base can do once it knows the scene, the upper bound the tuning reaches for when the picture
    replaces the text."""
    prompt_of = lambda s: (text_prompt(tok, s, canvas), None)
    return held_out_accuracy(llm, tok, seed, canvas, per_task, prompt_of, log)


@torch.no_grad()
def grounding_selection(llm, tok, seed: int, canvas: int, per_task: int = 40) -> dict:
    """Selection apart from copying: on the held-out grounding questions (scene as text) about two or more
    objects, how often the LLM's top token for the box's first number, given the answer up to it (' [0.'),
    is the named object's; and what naming an object at random scores. An LLM that copies exactly but
    picks the wrong item scores this chance (docs/results.md). None if no such question is among per_task."""
    right = chance = n = 0
    for s in world.eval_per_task(seed, per_task, canvas):
        if s.task != "grounding" or len(s.truth["objects"]) < 2:
            continue
        question, reference = s.turns[-1]
        prompt = text_prompt(tok, data.Sample(s.turns[:-1] + [(question, None)], s.task, image=s.image, truth=s.truth),
                             canvas)
        answer = tok.encode(" " + reference)
        k = next(i for i in range(len(answer)) if tok.decode(answer[:i]).endswith("."))   # ' [0.' | '04'
        logits = llm(torch.tensor([prompt + answer[:k]]))[0][0, -1]
        right += int(logits.argmax()) == answer[k]
        chance += 1 / len(s.truth["objects"])
        n += 1
    return {"right": right / n, "chance": chance / n, "questions": n} if n else None


# ----------------------------------------------------------------------------- views and their contents

PLACES = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))


def caption(contents) -> str:
    """What CLIP's alt-text would say about one view: 'red circle top left, the word CUP center'."""
    parts = []
    for colour, shape, b, _ in contents:
        place = PLACES[min(2, int(1.5 * (b[1] + b[3])))][min(2, int(1.5 * (b[0] + b[2])))]
        parts.append(f"{'the word' if shape == 'word' else colour + ' ' + shape} {place}")
    return ", ".join(parts) or "nothing"


def view_batch(seed: int, split: str, start: int, n_views: int, canvas: int, grid: int):
    """(views (N, 3, S, S), contents per view) from consecutive scenes; fully padded views are left out
    (the model never encodes them)."""
    views, contents, i = [], [], start
    while len(views) < n_views:
        s = world.synthetic_sample(seed, split, i, canvas)
        i += 1
        if s.image is None:
            continue
        tiles = tile(s.image, canvas, grid)
        for v, padded, c in zip(tiles.views, tiles.fully_padded, view_contents(s, canvas, grid)):
            if not padded:
                views.append(v)
                contents.append(c)
    return torch.stack(views[:n_views]), contents[:n_views], i


def view_stream(seed: int, n_views: int, canvas: int, grid: int):
    """Endless view batches from consecutive training scenes."""
    nxt = 0
    while True:
        views, contents, nxt = view_batch(seed, "train", nxt, n_views, canvas, grid)
        yield views, contents


# ----------------------------------------------------------------------------- 3-4: the encoders' objectives

def encoder_steps(args, which: str) -> int:
    return args.convnext_steps if which == "convnext" else args.vit_steps


def encoder_tokens(mov, which: str):
    """(tokens(views) -> (N, 1 + g*g, dim), dim) of one encoder ('convnext' or 'vit') as the MoV reads it."""
    if which == "convnext":
        return mov.convnext_tokens, mov.convnext.cfg.dims[-1]
    return mov.vit_tokens, mov.vit.cfg.dim


class TextTower(nn.Module):
    """A small causal text encoder (as CLIP's): the last token's state, projected."""

    def __init__(self, vocab: int, dim: int = 128, layers: int = 2, out: int = 128):
        super().__init__()
        self.cfg = model.ModelConfig(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=4, vocab_size=vocab, ffn_dim=4 * dim)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(model.Block(self.cfg) for _ in range(layers))
        self.norm = model.RMSNorm(dim, 1e-5)
        self.proj = nn.Linear(dim, out, bias=False)

    def forward(self, ids, lengths):
        h = self.embed(ids)
        cos, sin = model.rope_cos_sin(torch.arange(ids.shape[1]), self.cfg.head_dim, self.cfg.rope_theta)
        for b in self.blocks:
            h = b(h, cos, sin)
        return self.proj(self.norm(h)[torch.arange(len(ids)), lengths - 1])


def clip_loss(img, txt, scale, same):
    """Symmetric InfoNCE; views with identical captions are all positives of each other."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_contrastive(mov, which: str, tok, args, canvas, grid, log) -> list[float]:
    """CLIP-style training of one encoder ('convnext' or 'vit'); its pooled token (the ConvNeXt's grid
    mean, the ViT's cls) is the image embedding."""
    encoder, (tokens, dim) = getattr(mov, which), encoder_tokens(mov, which)
    text = TextTower(tok.vocab_size)
    head = nn.Linear(dim, 128, bias=False)
    log_scale = nn.Parameter(torch.tensor(2.66))           # CLIP's init: 1/0.07
    batches = view_stream(args.seed, args.vis_batch, canvas, grid)

    def loss_at(step):
        views, contents = next(batches)
        caps = [caption(c) for c in contents]
        ids = [tok.encode(c) for c in caps]
        lengths = torch.tensor([len(i) for i in ids])
        ids = torch.tensor([i + [tok.eos_id] * (int(lengths.max()) - len(i)) for i in ids])
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        return clip_loss(head(tokens(views)[:, 0]), text(ids, lengths), log_scale.exp().clamp(max=100), same)
    encoder.requires_grad_(True).train()
    params = list(encoder.parameters()) + list(text.parameters()) + list(head.parameters()) + [log_scale]
    losses = optimise(f"clip {which}", params, encoder_steps(args, which), args.vis_lr, loss_at, args.vis_batch,
                      log, args.log_every, weight_decay=0.05)
    encoder.requires_grad_(False).eval()
    return losses


def train_dense(mov, which: str, args, canvas, grid, log) -> list[float]:
    """Dense training of one encoder ('convnext' or 'vit'), as a detection backbone is pretrained: linear
    heads on every grid cell's token name what covers the cell (colour, shape, which word) and regress
    its box. The heads are thrown away; what stays is a token that carries, linearly, the shape, the
    letters and the exact place of what it sees, which a caption-level objective leaves out."""
    tokens, dim = encoder_tokens(mov, which)
    sizes = (len(COLOURS), len(SHAPES), len(TEXTS), 4)
    head = nn.Linear(dim, sum(sizes))
    batches = view_stream(args.seed, args.vis_batch, canvas, grid)

    def loss_at(step):
        views, contents = next(batches)
        f = tokens(views)[:, 1:]
        col, shp, wrd, box = cell_labels(contents, int(round(f.shape[1] ** 0.5)))
        pc, ps, pw, pb = head(f.flatten(0, 1)).split(sizes, dim=-1)
        # Which word and where: only over the cells that show a thing (a word covers ~3% of the cells, so
        # averaged over all of them its letters would hardly be trained). The word weighs more: reading three
        # letters from the pieces each cell sees is learnt last (the ConvNeXt's held-out word probe: 31% with
        # weight 1 and 800 steps, 90% with weight 3 and 1,600; docs/results.md). So does the shape: inside a
        # shape a cell shows a flat colour, and which shape it belongs to is told only by the outline around
        # it (the ConvNeXt's shape probe: 67% at weight 1, 81% at 3).
        on, word = shp > 0, wrd > 0
        return (F.cross_entropy(pc, col) + args.shape_weight * F.cross_entropy(ps, shp)
                + args.word_weight * F.cross_entropy(pw[word], wrd[word])
                + 10 * F.l1_loss(pb[on], box[on]))
    encoder = getattr(mov, which)
    encoder.requires_grad_(True).train()
    losses = optimise(f"dense {which}", list(encoder.parameters()) + list(head.parameters()),
                      encoder_steps(args, which), args.vis_lr, loss_at, args.vis_batch, log, args.log_every,
                      weight_decay=0.05)
    encoder.requires_grad_(False).eval()
    return losses


# ----------------------------------------------------------------------------- 4: masked-image ViT (--vit-objective mim)

def patches(views, p: int):
    """(N, 3, S, S) -> (N, (S/p)^2, 3 p p), row-major like the ViT's tokens."""
    N, C, S, _ = views.shape
    return views.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(N, (S // p) ** 2, C * p * p)


def train_vit(mov, args, canvas, grid, log, mask_ratio: float = 0.5) -> list[float]:
    cfg = mov.vit.cfg
    head = nn.Linear(cfg.dim, 3 * cfg.patch ** 2)
    gen = torch.Generator().manual_seed(args.seed)
    batches = view_stream(args.seed, args.vis_batch, canvas, grid)

    def loss_at(step):
        views, _ = next(batches)
        target = patches(views, cfg.patch)
        n = target.shape[1]
        mask = torch.rand(len(views), n, generator=gen).argsort(1) < round(mask_ratio * n)   # a random half
        pred = head(mov.vit_tokens(views, mask)[:, 1:])
        return F.mse_loss(pred[mask], target[mask])
    mov.vit.requires_grad_(True).train()
    losses = optimise("mim vit", list(mov.vit.parameters()) + list(head.parameters()), args.vit_steps, args.vis_lr,
                      loss_at, args.vis_batch, log, args.log_every, weight_decay=0.05)
    mov.vit.requires_grad_(False).eval()
    return losses


@torch.no_grad()
def standardise_outputs(mov, seed: int, canvas: int, grid: int, n_views: int = 2048):
    """Give every output channel of both frozen encoders zero mean and unit variance over training
    views, folded into their final LayerNorm ((w * n + b - mean) / std is again w' * n + b'), so the
    architecture and its checkpoint layout are unchanged. Why: the fresh projector reads these
    channels, and Adam moves each of its weights at the same rate whatever the channel's offset and
    spread, so unnormalised channels (means up to 0.4, spreads 0.2 to 2.2 here) slow the tuning down:
    measured on "What color is the <shape>?" about one-object scenes, 100 tuning steps reach 27%
    held-out accuracy (chance 17%) without this and 73% with it."""
    views, _, _ = view_batch(seed, "train", 0, n_views, canvas, grid)
    for norm, tokens in ((mov.convnext.head_norm, mov.convnext_tokens), (mov.vit.norm, mov.vit_tokens)):
        f = tokens(views).flatten(0, 1)
        mean, std = f.mean(0), f.std(0)
        norm.bias.sub_(mean).div_(std)
        norm.weight.div_(std)


# ----------------------------------------------------------------------------- 5: linear probes

def ridge(xtr, ytr, xte, lam=1e-3):
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    a, b = F.pad(a, (0, 1), value=1.0), F.pad(b, (0, 1), value=1.0)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ ytr)
    return b @ w


@torch.no_grad()
def probe(mov, seed: int, canvas: int, grid: int, n_train: int = 1500, n_test: int = 500) -> dict:
    """Linear probes (ridge regression) of frozen per-cell features, over the grid cells whose centre a
    thing covers: its colour (7 classes, the word's black included), its shape (4, the word included),
    and its box: mean absolute error of the four coordinates in canvas pixels; over the cells a word
    covers, which word (8 classes)."""
    vtr, ctr, _ = view_batch(seed, "train", 10 ** 7, n_train, canvas, grid)      # scenes no stage trained on
    vte, cte, _ = view_batch(seed, "eval", 0, n_test, canvas, grid)
    out = {}
    feats = {k: encoder_tokens(mov, k)[0] for k in ("convnext", "vit")}          # the cls token left out below
    ftr = {k: f(vtr)[:, 1:].flatten(0, 1).double() for k, f in feats.items()}
    fte = {k: f(vte)[:, 1:].flatten(0, 1).double() for k, f in feats.items()}
    ftr["both"], fte["both"] = torch.cat(list(ftr.values()), 1), torch.cat(list(fte.values()), 1)
    g = int(round((ftr["vit"].shape[0] / len(vtr)) ** 0.5))
    (ctr_c, ctr_s, ctr_w, ctr_b), (cte_c, cte_s, cte_w, cte_b) = cell_labels(ctr, g), cell_labels(cte, g)
    # View coordinates -> canvas pixels: the global view spans the canvas, a sub-image 1/grid of it.
    px = torch.tensor([canvas if v % (1 + grid * grid) == 0 else canvas / grid for v in range(len(vte))])
    px = px.repeat_interleave(g * g)
    on_tr, on_te, word_tr, word_te = ctr_s > 0, cte_s > 0, ctr_w > 0, cte_w > 0
    for k in ftr:
        # Over the cells a thing covers ('none' is most cells, and easy): which colour, which shape, its box;
        # over the cells a word covers, which word.
        a, b = ftr[k][on_tr], fte[k][on_te]
        c = ridge(a, F.one_hot(ctr_c[on_tr], len(COLOURS)).double(), b).argmax(1)
        s = ridge(a, F.one_hot(ctr_s[on_tr], len(SHAPES)).double(), b).argmax(1)
        box = ridge(a, ctr_b[on_tr].double(), b)
        w = ridge(ftr[k][word_tr], F.one_hot(ctr_w[word_tr], len(TEXTS)).double(), fte[k][word_te]).argmax(1)
        out[k] = {"colour": (c == cte_c[on_te]).double().mean().item(),
                  "word": (w == cte_w[word_te]).double().mean().item(),
                  "shape": (s == cte_s[on_te]).double().mean().item(),
                  "box_px": ((box - cte_b[on_te]).abs().mean(1) * px[on_te]).mean().item()}
    return out


def probe_table(before: dict, after: dict) -> str:
    lines = ["| features | colour acc (random -> pretrained) | shape acc | word acc | box error (canvas px) |",
             "|---|---|---|---|---|"]
    for k in before:
        b, a = before[k], after[k]
        lines.append(f"| {k} | {b['colour']:.1%} -> {a['colour']:.1%} | {b['shape']:.1%} -> {a['shape']:.1%} | "
                     f"{b['word']:.1%} -> {a['word']:.1%} | {b['box_px']:.1f} -> {a['box_px']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 6-7: scene tokens, the projector

def train_scene(scene: model.Sphinx, tok, args, cfg, autocast: bool, log, place: bool = False) -> list[float]:
    """Stage 6: the tuning's conversations with each scene given as its cells' attributes, in the image
    block's place and layout; the loss on the answers, as in the tuning. The LLM learns to find what a
    question names among the image tokens and to say what it holds, before any encoder is involved: the
    tuning measured the same pace with these perfect tokens as with the encoders' (docs/results.md), so
    the samples it needs are the LLM's, and this stage spends them without pixels.
    place: the second phase (--place-steps, new scenes with several tasks each) in which the cells
    also carry their box's place code (tools/scene_tokens.py) and come in a random order per view. Given
    from the start, the code's 40 inputs per cell took the tiny LLM's samples from the shapes (captions 12%
    against 82.5%); after the first phase the LLM keeps the shapes, but with the cells in order it goes on
    reading the place off which token it attends to and uses the code half; shuffled, it must read the
    value (docs/results.md). --scene-text-every N: every N-th step of both phases is a text-form batch
    instead (answers only), so the LLM keeps reading the scene written as text, which the stage alone erases."""
    max_len, g = train.RECIPES["tiny"]["max_len"], scene_grid(cfg)
    steps, first, tasks = ((args.place_steps, SCENE_START + args.scene_steps * args.scene_batch, PLACE_TASKS)
                           if place else (args.scene_steps, SCENE_START, 1))
    scene.mov.place_code = place
    scene.mov.shuffle = torch.Generator().manual_seed(args.seed) if place else None

    def loss_at(step):
        if args.scene_text_every and step % args.scene_text_every == args.scene_text_every - 1:
            start = SCENE_TEXT_START + (step + (args.scene_steps if place else 0)) * args.llm_batch
            x, y = text_batch(tok, args, cfg.canvas, start, True, PLACE_TASKS)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return scene.llm(x, targets=y)[1]
        start = first + step * args.scene_batch
        samples = [world.synthetic_sample(args.seed, "train", i, cfg.canvas, tasks) for i in range(start, start + args.scene_batch)]
        b = data.collate([encode_scene(s, tok, max_len, scene.layout, g) for s in samples], tok)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return scene(b["tokens"], b["images"], b["targets"])[1]
    fresh = list(scene.mov.parameters()) + [getattr(scene, name) for name in loading.IMAGE_TAGS]
    groups = [{"params": list(scene.llm.parameters())}, {"params": fresh, "lr_scale": SCENE_FRESH_LR}]
    scene.train()
    return optimise("place code" if place else "scene tokens", groups, steps, args.scene_lr, loss_at,
                    args.scene_batch, log, args.log_every, betas=(0.9, 0.95), clip=1.0)


def eval_scene_form(scene: model.Sphinx, tok, seed: int, cfg, per_task: int = 20, log=print) -> dict:
    """Greedy answers to held-out questions with the scene given as its cells' attributes."""
    scene.eval()
    return held_out_accuracy(scene, tok, seed, cfg.canvas, per_task, scene_prompt(scene, tok, scene_grid(cfg)), log)


@torch.no_grad()
def place_check(scene: model.Sphinx, tok, seed: int, cfg, per_task: int = 40, dx: float = 0.2) -> dict:
    """Does the LLM read the box in a token, or say a box from which token it attends to? The held-out
    grounding questions in scene form answered twice, the second time with every box moved by dx in x:
    the answers' x1 moves by about dx if it reads the value, not at all if only the token's place
    (docs/results.md). Also the first answers' share right and median error of each coordinate."""
    pose = scene_prompt(scene, tok, scene_grid(cfg))
    samples = [s for s in world.eval_per_task(seed, per_task, cfg.canvas) if s.task == "grounding"]

    def moved(s):
        ids, tiles = pose(s)
        return ids, replace(tiles, views=shift_boxes(tiles.views, dx))
    runs = []
    scene.eval()
    for prompt_of in (pose, moved):
        runs.append([])
        train.evaluate(scene, tok, one_process(), samples, prompt_of, log=lambda *a: None, answers=runs[-1])
    first, then = ([(world.parse_boxes(a["answer"]) or [[]])[0] for a in run] for run in runs)
    moves = [b[0] - a[0] for a, b in zip(first, then) if len(a) == 4 and len(b) == 4]
    truth = [world.parse_boxes(s.turns[-1][1])[0] for s in samples]
    errors = torch.tensor([[abs(x - y) for x, y in zip(a, t)] for a, t in zip(first, truth) if len(a) == 4])
    return {"dx": dx, "mean_move": sum(moves) / max(1, len(moves)),
            "unchanged": sum(abs(m) < 0.005 for m in moves) / max(1, len(moves)), "answers": len(moves),
            "right": sum(world.score("grounding", a["answer"], s.turns[-1][1])
                         for a, s in zip(runs[0], samples)) / len(samples),
            "median_error": errors.median(0).values.tolist() if len(errors) else None}


def eval_pictures(sphinx: model.Sphinx, tok, seed: int, canvas: int, per_task: int = 40, log=print) -> dict:
    """The same questions about the pictures themselves: the base before any tuning."""
    sphinx.eval()
    return held_out_accuracy(sphinx, tok, seed, canvas, per_task, log=log)


def scene_reused(args) -> bool:
    """--reuse-llm names a base whose LLM went through the scene-token stage: that stage is not redone."""
    return bool(args.reuse_llm) and loading.has_scene_tokens(args.reuse_llm)


def load_reused_scene(path, scene: model.Sphinx) -> bool:
    """The reused base's scene parts into `scene`; True if its scene stage had the place code. A base made
    without it gets zero weights for the place code's inputs: what it computes is unchanged."""
    wide = scene.mov.proj[0]
    n_in = loading.tensor_shape(path, loading.SCENE_PREFIX + "proj.0.weight")[1]
    if n_in == wide.in_features:
        loading.load_scene_parts(path, scene)
        return True
    scene.mov.proj[0] = nn.Linear(n_in, wide.out_features)
    loading.load_scene_parts(path, scene)
    narrow, scene.mov.proj[0] = scene.mov.proj[0], wide
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :n_in] = narrow.weight
        wide.bias.copy_(narrow.bias)
    return False


def scene_stage(args, cfg, tok, sphinx, autocast: bool, log) -> dict | None:
    """Stages 6-7: the scene-token stage (or the reused LLM's) and its place-code phase, then the projector
    fitted to the encoders. Sets sphinx's image tags, skip token and projector; None when --scene-steps 0
    (the tuning starts a fresh projector, as the paper's one stage does)."""
    scene, reused = scene_model(cfg, sphinx.llm), scene_reused(args)
    if reused:                                               # the reused LLM already reads scene tokens: keep its parts
        placed = load_reused_scene(args.reuse_llm, scene)
        old = loading.base_summary(args.reuse_llm)
        out = {"scene_form_eval": old["scene_form_eval"], "minutes": old["minutes"]["scene"], "losses": old["losses"]["scene"],
               **{k: old[k] for k in ("place_check", "text_form_after_scene") if k in old}}
    elif args.scene_steps:
        t, placed = time.perf_counter(), False
        out = {"losses": train_scene(scene, tok, args, cfg, autocast, log)[::50]}
        out["minutes"] = (time.perf_counter() - t) / 60
    else:
        return None
    place_now = bool(args.place_steps) and not placed
    if place_now:
        t = time.perf_counter()
        out["losses"] = out["losses"] + train_scene(scene, tok, args, cfg, autocast, log, place=True)[::50]
        out["minutes"] += (time.perf_counter() - t) / 60
    scene.mov.place_code, scene.mov.shuffle = True, None
    if not reused or place_now:
        out["scene_form_eval"] = eval_scene_form(scene, tok, args.seed, cfg, per_task=args.eval_per_task)
        out["place_check"] = place_check(scene, tok, args.seed, cfg, per_task=args.eval_per_task)
        out["text_form_after_scene"] = eval_text_form(scene.llm, tok, args.seed, cfg.canvas, args.eval_per_task, log=log)
    if "place_check" in out:
        c = out["place_check"]
        log(f"place check: every box moved by {c['dx']} in x, the grounding answers' x1 moves by "
            f"{c['mean_move']:.3f} on average ({c['unchanged']:.0%} unchanged; {c['dx']} if the LLM reads the box); "
            f"{c['right']:.0%} right, median error per coordinate " + ", ".join(f"{e:.2f}" for e in c["median_error"] or []))
    log("LLM base, held-out questions with the scene given as cell attributes: " +
        ", ".join(f"{k} {v:.0%}" for k, v in out["scene_form_eval"].items()))
    if "text_form_after_scene" in out:     # the scene stage trains on image blocks only: what is left of the text form
        log("the same LLM with the scene given as text: " +
            ", ".join(f"{k} {v:.0%}" for k, v in out["text_form_after_scene"].items()))
    for name in loading.IMAGE_TAGS:
        getattr(sphinx, name).data.copy_(getattr(scene, name).data)
    views, contents, _ = view_batch(args.seed, "train", SCENE_START, FIT_VIEWS, cfg.canvas, cfg.grid)
    out["projector_fit_r2"] = fit_projector(sphinx.mov, scene.mov.proj, views, cell_attributes(contents, scene_grid(cfg)))
    log("projector fitted to the scene tokens, R^2 " + ", ".join(f"{k} {v:.2f}" for k, v in out["projector_fit_r2"].items()))
    out["picture_eval"] = eval_pictures(sphinx, tok, args.seed, cfg.canvas, args.eval_per_task, log=log)
    log("the base from pictures, before any tuning: " + ", ".join(f"{k} {v:.0%}" for k, v in out["picture_eval"].items()))
    out["scene_proj"] = scene.mov.proj
    return out


# ----------------------------------------------------------------------------- the base

def refusal(args, cfg) -> str | None:
    """Why this base must not be made as asked, or None."""
    if cfg.llm.n_experts:
        return (f"{args.size}: the MoE size starts from the dense base by sparse upcycling (train.py does it); "
                "make the base with --size tiny")
    target = Path(args.out) / f"{args.size}.safetensors"
    if target.exists() and not args.overwrite:
        return f"{target} exists (hours of work); pass --overwrite to replace it, or another --out"
    for flag, path in (("--reuse-llm", args.reuse_llm), ("--reuse-vision", args.reuse_vision)):
        if path and not Path(path).is_file():
            return f"{flag} {path}: no such file"
    source = tokenizer_source(args)
    if source and not (Path(source).parent / "tokenizer.json").is_file():
        flag = "--reuse-llm" if source == args.reuse_llm else "--reuse-vision"
        return f"{flag} {source}: no tokenizer.json beside it (the reused part knows only that tokenizer's ids)"
    return None


def train_encoder(mov, which: str, objective: str, tok, args, canvas, grid, log) -> list[float]:
    if objective == "dense":
        return train_dense(mov, which, args, canvas, grid, log)
    if objective == "clip":
        return train_contrastive(mov, which, tok, args, canvas, grid, log)
    return train_vit(mov, args, canvas, grid, log)                       # "mim": the ViT only


def vision_stages(args, cfg, tok, sphinx, log) -> dict:
    """Stages 3-5: each encoder by its objective, standardised outputs, probes before and after."""
    before = probe(sphinx.mov, args.seed, cfg.canvas, cfg.grid)
    t = time.perf_counter()
    losses = {which: train_encoder(sphinx.mov, which, objective, tok, args, cfg.canvas, cfg.grid, log)[::10]
              for which, objective in (("convnext", args.convnext_objective), ("vit", args.vit_objective))}
    standardise_outputs(sphinx.mov, args.seed, cfg.canvas, cfg.grid)
    minutes = (time.perf_counter() - t) / 60
    after = probe(sphinx.mov, args.seed, cfg.canvas, cfg.grid)
    log("linear probes of the frozen encoders (held-out views):\n" + probe_table(before, after))
    return {"minutes": minutes, "losses": losses, "probes": {"random": before, "pretrained": after}}


def base_llm(path, cfg: model.ModelConfig) -> model.Transformer:
    """The LLM of a base file alone (its encoders may have another shape than the ones being made)."""
    llm = model.build(cfg)
    result = llm.load_state_dict({k[4:]: v for k, v in safetensors.torch.load_file(path).items()
                                  if k.startswith("llm.")}, strict=False)
    tied = {"output.weight"} if cfg.tie_embeddings else set()    # stored once, as the embedding
    if set(result.missing_keys) != tied or result.unexpected_keys:
        raise ValueError(f"{path}: not an LLM of this size (missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys})")
    return llm


def tokenizer_source(args) -> str | None:
    """The reused base whose tokenizer the new base keeps: a reused LLM's, or reused encoders' when one learnt
    from captions (its caption tower depends on it); None: a new one (dense encoders never read text)."""
    made_by = loading.base_summary(args.reuse_vision)["recipe"] if args.reuse_vision else {}
    captions = "clip" in (made_by.get("convnext_objective"), made_by.get("vit_objective"))
    return args.reuse_llm or (args.reuse_vision if captions else None)


def tokenizer_for(args, cfg, out: Path, log) -> data.Tokenizer:
    """The base's tokenizer: the reused one (tokenizer_source), copied beside the new base, or a new one."""
    tok_path = out / "tokenizer.json"
    reused = tokenizer_source(args)
    if reused:
        if Path(reused).parent.resolve() != out.resolve():
            shutil.copyfile(Path(reused).parent / "tokenizer.json", tok_path)
        tok = data.Tokenizer(tok_path)
    else:
        tok = data.train_tokenizer(base_texts(args.seed, 0, 4000, cfg.canvas), cfg.llm.vocab_size, tok_path)
    log(f"tokenizer: {tok.vocab_size} tokens -> {tok_path}")
    return tok


def main(argv=None):
    args = parse_args(argv)
    log = lambda *a: print(*a, flush=True)
    cfg = model.sphinx_config(args.size)
    problem = refusal(args, cfg)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    dtype, why = model.pick_dtype(args.dtype)
    autocast = dtype == "bf16"
    log(f"tiny base for {args.size}: LLM stage in {'bf16 autocast' if autocast else 'fp32'} ({why})")
    tok = tokenizer_for(args, cfg, out, log)
    torch.manual_seed(args.seed)
    if args.reuse_vision:                    # the vision stages do not depend on the LLM: keep them
        sphinx, old = loading.load_base(args.reuse_vision, cfg), loading.base_summary(args.reuse_vision)
        vision = {"minutes": old["minutes"]["vision"], "probes": old["probes"],
                  "losses": {k: v for k, v in old["losses"].items() if k not in ("llm", "scene")}}
    else:
        sphinx = model.build_sphinx(cfg)
        vision = vision_stages(args, cfg, tok, sphinx, log)
    if args.reuse_llm:
        old = loading.base_summary(args.reuse_llm)
        sphinx.llm = base_llm(args.reuse_llm, cfg.llm)
        llm_losses, t_llm, text_scores = old["losses"]["llm"], old["minutes"]["llm"] * 60, old["text_form_eval"]
        selection = old.get("grounding_selection")
    else:
        if args.reuse_vision:                # the LLM a full run starts from (its init ignores the encoders)
            torch.manual_seed(args.seed)
            sphinx.llm = model.build_sphinx(cfg).llm
        t = time.perf_counter()
        llm_losses = train_llm(sphinx.llm, tok, args, cfg.canvas, autocast, log)[::50]
        t_llm = time.perf_counter() - t
        text_scores = eval_text_form(sphinx.llm, tok, args.seed, cfg.canvas, per_task=args.eval_per_task)
        selection = grounding_selection(sphinx.llm, tok, args.seed, cfg.canvas, per_task=args.eval_per_task)
    log("LLM base, held-out questions with the scene given as text: " +
        ", ".join(f"{k} {v:.0%}" for k, v in text_scores.items()))
    if selection:
        log(f"  grounding among {selection['questions']} scenes of 2+ objects: the named object's first number "
            f"{selection['right']:.0%} (naming one at random: {selection['chance']:.0%})")
    scene = scene_stage(args, cfg, tok, sphinx, autocast, log)
    recipe = {k: getattr(args, k) for k in RECIPE} | {k: getattr(args, k) for k in (
        "convnext_objective", "vit_objective", "llm_loss", "tasks_per_image", "induction_warmup", "induction_every",
        "scene_text_every")}
    for reused, keys in ((args.reuse_vision, VISION_KEYS), (args.reuse_llm, LLM_KEYS),
                         (scene_reused(args) and args.reuse_llm, SCENE_KEYS)):
        if reused:                           # a reused part is described by the recipe that made it
            made_by = loading.base_summary(reused)["recipe"]
            recipe |= {k: made_by[k] for k in keys if k in made_by}
    t_scene = scene["minutes"] if scene else 0.0
    summary = {"recipe": recipe, "autocast_bf16": autocast,
               "minutes": {"vision": vision["minutes"], "llm": t_llm / 60, "scene": t_scene,
                           "total": vision["minutes"] + t_llm / 60 + t_scene,          # the stages' work, reused or not
                           "this_run": (time.perf_counter() - t_all) / 60},
               "losses": vision["losses"] | {"llm": llm_losses} | ({"scene": scene["losses"]} if scene else {}),
               "probes": vision["probes"], "text_form_eval": text_scores} | (
                   {"grounding_selection": selection} if selection else {})
    if scene:
        summary |= {k: scene[k] for k in ("scene_form_eval", "place_check", "text_form_after_scene", "projector_fit_r2",
                                          "picture_eval") if k in scene}
    loading.save_base(out / f"{args.size}.safetensors", sphinx, summary, scene["scene_proj"] if scene else None)
    log(f"saved {out / f'{args.size}.safetensors'} and {out / 'tokenizer.json'} in {summary['minutes']['this_run']:.1f} min")


if __name__ == "__main__":
    main()
