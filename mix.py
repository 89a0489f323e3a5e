"""Weight mixing: one model's LLM weights blended with another's (SPHINX, arXiv 2311.07575: the weight
mix of its pre-training stage).

    python mix.py real.safetensors synthetic.safetensors --beta 0.5 --out mixed.safetensors

Both are our checkpoints of the same configuration (e.g. one run tuned on real-world data and one on
synthetic data, from the same start). theta = beta * a + (1 - beta) * b over the LLM; the encoders,
projector and image tags are a's. The result loads in sample.py like any checkpoint; a's tokenizer.json
is copied beside it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import loading as L
from checkpoint import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--beta", type=float, default=0.5, help="weight of a (SPHINX: the real-world data's LLM)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        a, b = L.load_sphinx(args.a), L.load_sphinx(args.b)
        mixed = L.mix_weights(a, b, args.beta)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        L.save_sphinx(out, mixed, {"mixed_from": [str(args.a), str(args.b)], "beta": args.beta})
        tok = Path(args.a).parent / "tokenizer.json"
        if tok.exists() and not (out.parent / "tokenizer.json").exists():
            shutil.copyfile(tok, out.parent / "tokenizer.json")
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: LLM = {args.beta:g} x {args.a} + {1 - args.beta:g} x {args.b}; the rest from {args.a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
