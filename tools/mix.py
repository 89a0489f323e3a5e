"""Weight mixing: one model's LLM weights blended with another's (SPHINX, arXiv 2311.07575: the weight
mix of its pre-training stage).

    python -m tools.mix real.safetensors synthetic.safetensors --beta 0.5 --out mixed.safetensors

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

import loading
from checkpoint import CheckpointError, load_state_strict, unique_state_dict
from model import Sphinx, build_sphinx



def mix_weights(a: Sphinx, b: Sphinx, beta: float, parts=("llm.",)) -> Sphinx:
    """SPHINX's weight mix (arXiv 2311.07575, its pre-training stage): theta = beta * a + (1 - beta) * b
    over the tensors under `parts` (the LLM: one tuned on real-world data, one on synthetic data, from a shared
    start), computed in fp32; every other tensor (encoders, projector, image tags) is a's. Returns a new
    model; a and b are left as they are."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}")
    if a.cfg != b.cfg:
        raise CheckpointError(f"the two models differ in configuration:\n  a {a.cfg}\n  b {b.cfg}")
    sa, sb = unique_state_dict(a), unique_state_dict(b)
    mixed = {n: ((beta * t.float() + (1 - beta) * sb[n].float()).to(t.dtype) if n.startswith(parts) else t.clone())
             for n, t in sa.items()}
    model = build_sphinx(a.cfg, init=False)
    load_state_strict(model, mixed.items(), dtype=next(a.parameters()).dtype, where="mixed weights")
    model.mov.freeze_encoders()
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--beta", type=float, default=0.5, help="weight of a (SPHINX: the real-world data's LLM)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        a, b = loading.load_sphinx(args.a), loading.load_sphinx(args.b)
        mixed = mix_weights(a, b, args.beta)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        loading.save_sphinx(out, mixed, {"mixed_from": [str(args.a), str(args.b)], "beta": args.beta})
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
