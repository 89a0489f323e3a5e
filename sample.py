"""Ask a SPHINX-X model about a photo: streamed answer, KV cache, boxes drawn.

    python sample.py image.jpg "What is in the image?"
    python sample.py image.jpg "Detect all the objects in the image." --draw out.png
    python sample.py "What is 12 + 7?"                       # text only
    python sample.py image.jpg --chat                         # multi-turn about one image

Default checkpoint: out/tiny/model.safetensors (from `torchrun train.py --size tiny`), with its
tokenizer.json beside it. The paper sizes can be assembled from component safetensors:
    python sample.py img.jpg "..." --size sphinx-tiny --llm TinyLlama-dir --convnext convnext.safetensors \
        --dinov2 dinov2.safetensors --projector sphinx_proj.safetensors --tokenizer tokenizer.model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import data
import loading
from model import DTYPES, pick_dtype
from checkpoint import CheckpointError
from generate import generate
from moe import moe_layers, prune_experts, set_top_k
from tiling import ImageError, labelled_boxes, load_image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="[image] prompt")
    p.add_argument("--ckpt", default="out/tiny/model.safetensors",
                   help="our checkpoint, a run directory holding one, or a released SPHINX-X directory")
    p.add_argument("--tokenizer", default=None, help="default: tokenizer.json beside the checkpoint")
    p.add_argument("--temperature", type=float, default=0.1, help="0 = greedy (reference demo: 0.1)")
    p.add_argument("--top-p", type=float, default=0.75)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on a GPU; on a CPU bf16 only with bf16 instructions and a model of d >= 1024 "
                        "(decoding is matrix-vector products)")
    p.add_argument("--experts", type=int, default=None, help="active experts per token (MoE)")
    p.add_argument("--keep-experts", default=None, metavar="I,J,...",
                   help="MoE: route only to these experts in every layer (paper App. A.1.3's pruning)")
    p.add_argument("--no-skip-tokens", action="store_true", help="encode fully padded sub-images too")
    p.add_argument("--chat", action="store_true", help="multi-turn conversation about the same image")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster tokens after a one-time compile (tens of seconds on CPU)")
    p.add_argument("--draw", default=None, help="draw the boxes and points of the answer on the photo")
    g = p.add_argument_group("assemble a paper size from component safetensors")
    g.add_argument("--size", default=None)
    g.add_argument("--llm", default=None, help="HF-format LLM directory")
    g.add_argument("--convnext", default=None)
    g.add_argument("--dinov2", default=None)
    g.add_argument("--projector", default=None, help="mov.proj.*, begin/end_of_image, skip_token")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, not {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, not {args.temperature}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, mps, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA GPU (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        p.error(f"--device {args.device}: MPS is not available here (use --device cpu)")
    return args


def our_checkpoint(ckpt: Path) -> Path | None:
    """Our checkpoint file, or the one inside a run directory (out/tiny, step-N/); None for anything else."""
    if ckpt.is_file():
        return ckpt
    return ckpt / "model.safetensors" if (ckpt / "model.safetensors").is_file() else None


def load(args):
    overrides = {"skip_tokens": False} if args.no_skip_tokens else {}
    ckpt = Path(args.ckpt)
    if not args.size and not ckpt.exists():
        raise CheckpointError(f"no checkpoint at {ckpt}; make one with: torchrun train.py --size tiny (or pass --ckpt)")
    ours = None if args.size else our_checkpoint(ckpt)
    if ours:
        model = loading.load_sphinx(ours, **overrides)
        tok_path = args.tokenizer or loading.tokenizer_beside(ours) or ours.parent / "tokenizer.json"
    else:
        from formats import outside        # the wing, only for an outside format
        if not args.size and not outside.is_released_dir(ckpt):
            raise CheckpointError(f"{ckpt}: expected our checkpoint (model.safetensors, or a run directory holding "
                                  "one) or a released SPHINX-X directory (meta.json + consolidated.*.model.pth)")
        wide = torch.bfloat16 if args.device != "cpu" else torch.float32
        model, tok_path = outside.load_for_sampling(args, wide, **overrides)
    if not tok_path or not Path(tok_path).exists():
        raise CheckpointError(f"no tokenizer at {tok_path}; pass --tokenizer")
    for flag, value in (("--experts", args.experts), ("--keep-experts", args.keep_experts)):
        if value is not None and not moe_layers(model):
            raise ValueError(f"{flag} applies to MoE sizes only")
    if args.experts is not None:
        set_top_k(model, args.experts)
    if args.keep_experts is not None:
        try:
            keep = [int(e) for e in args.keep_experts.split(",")]
        except ValueError:
            raise ValueError(f"--keep-experts {args.keep_experts!r}: expected expert numbers like 0,2,5") from None
        prune_experts(model, keep)
    dtype, why = pick_dtype(args.dtype, args.device, decode_dim=model.llm.cfg.dim)
    print(f"({dtype}: {why})", file=sys.stderr)
    return model.to(args.device, DTYPES[dtype]).eval(), data.Tokenizer(tok_path)


def answer(model, tok, turns, tiles, args, out=sys.stdout) -> str:
    """Stream the reply to the last question of `turns`, token by token."""
    tokens = data.prompt_tokens(tok, turns)
    gen = torch.Generator().manual_seed(args.seed)
    stop = "\n" + data.SEP
    ids, shown = [], ""
    for t in generate(model, tokens, tiles, args.max_new_tokens, stop_ids=(tok.eos_id,), stop_text=stop,
                        decode=tok.decode, temperature=args.temperature, top_p=args.top_p, generator=gen,
                        compile=args.compile):
        ids.append(t)
        text = tok.decode(ids).lstrip()
        # hold back a tail that may be the start of the stop text
        text = next((text[:-k] for k in range(len(stop), 0, -1) if text.endswith(stop[:k])), text)
        if text.startswith(shown):            # print only what is new (multi-byte pieces may still change)
            out.write(text[len(shown):])
            out.flush()
            shown = text
    final = tok.decode(ids).removesuffix("\n" + data.SEP).strip()
    out.write("\n")
    return final


def draw_answer(photo, text: str, layout, path):
    """Boxes [x1, y1, x2, y2] and points [x, y] of the answer, labelled by the text before them, drawn on
    the original photo (the model's normalised coordinates mapped back to photo pixels by its layout)."""
    from PIL import ImageDraw
    img = photo.copy()
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 200))
    for label, vals in labelled_boxes(text):
        label = label[-30:]
        vals = layout.to_photo(vals, img.size)
        if len(vals) == 4:
            vals = [min(vals[0], vals[2]), min(vals[1], vals[3]), max(vals[0], vals[2]), max(vals[1], vals[3])]
            draw.rectangle(vals, outline=(255, 0, 0), width=width)
            draw.text((vals[0] + 2, vals[1] + 2), label, fill=(255, 0, 0))
        else:
            r = 2 * width
            draw.ellipse((vals[0] - r, vals[1] - r, vals[0] + r, vals[1] + r), fill=(255, 0, 0))
            draw.text((vals[0] + r + 1, vals[1] - r), label, fill=(255, 0, 0))
    img.save(path)
    return img


def fits(model, tok, turns, tiles, args) -> bool:
    """Prompt + image block + the longest answer within the LLM's context."""
    n = len(data.prompt_tokens(tok, turns)) + (model.layout.block_len(tiles.fully_padded) if tiles is not None else 0)
    return n + args.max_new_tokens <= model.llm.cfg.max_seq_len


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if len(args.inputs) > 2 or (not args.inputs and not args.chat):
            raise ValueError("usage: python sample.py [image] \"prompt\" (or [image] --chat)")
        if len(args.inputs) == 1 and not args.chat and Path(args.inputs[0]).is_file():
            raise ValueError(f"{args.inputs[0]} is an image but there is no prompt: python sample.py "
                             f"{args.inputs[0]} \"What is in the image?\" (or add --chat)")
        image_path = args.inputs[0] if len(args.inputs) == 2 or (args.chat and len(args.inputs) == 1) else None
        prompt = args.inputs[-1] if len(args.inputs) == 2 or (len(args.inputs) == 1 and not args.chat) else None
        photo = load_image(image_path) if image_path else None
        model, tok = load(args)
        tiles = model.layout.tile(photo) if photo is not None else None
        turns = []
        while True:
            if prompt is None:
                try:
                    prompt = input("you> ").strip()
                except EOFError:
                    return 0
                if not prompt:
                    return 0
            if not fits(model, tok, [(prompt, None)], tiles, args):      # refused; the session goes on
                print(f"error: that message does not fit the context of {model.llm.cfg.max_seq_len} positions "
                      f"with --max-new-tokens {args.max_new_tokens}; try a shorter one", file=sys.stderr)
                if not args.chat:
                    return 1
                prompt = None
                continue
            turns.append((prompt, None))
            while not fits(model, tok, turns, tiles, args):
                turns.pop(0)
                print("(context full: the oldest turn was dropped)", file=sys.stderr)
            reply = answer(model, tok, turns, tiles, args)
            turns[-1] = (prompt, reply)
            if args.draw and photo is not None:
                draw_answer(photo, reply, model.layout, args.draw)
                print(f"(boxes drawn on {args.draw})", file=sys.stderr)
            if not args.chat:
                return 0
            prompt = None
    except (ImageError, CheckpointError, data.DataError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
