"""What the entry scripts call when a user hands them an outside format: the one door into this wing.

train.py and sample.py import this module only inside the branch that meets such a path, so the core
runs (and imports) without the wing."""
from __future__ import annotations

from pathlib import Path

import model as M
from checkpoint import CheckpointError
from formats.hf import load_parts
from formats.released import load_released
from loading import same_architecture


def is_released_dir(path) -> bool:
    """LLaMA2-Accessory's layout: meta.json beside consolidated.NN-of-MM.model.pth shards."""
    path = Path(path)
    return path.is_dir() and (path / "meta.json").exists() and any(path.glob("consolidated.*.model.pth"))


def load_start(args, cfg: M.SphinxConfig, tp_group=None) -> M.Sphinx:
    """train.py's start from outside: a released SPHINX-X directory (--init) or the paper's downloaded
    parts (--llm, --convnext, --dinov2), each rank reading only its TP shard."""
    if args.llm:
        return load_parts(cfg, args.llm, args.convnext, args.dinov2, tp_group=tp_group)
    model = load_released(args.init, cfg, tp_group=tp_group)
    if not same_architecture(model.cfg.llm, cfg.llm):
        raise CheckpointError(f"--init {args.init}: its LLM ({model.cfg.llm}) is not --size {args.size}'s ({cfg.llm})")
    return model


def load_for_sampling(args, dtype, **overrides):
    """sample.py's model from outside: a released directory (--ckpt DIR) or a paper size from parts
    (--size with --llm, --convnext, --dinov2, --projector). Returns (model, tokenizer path)."""
    if args.size:
        missing = [f"--{k}" for k in ("llm", "convnext", "dinov2", "projector") if not getattr(args, k)]
        if missing:
            raise CheckpointError(f"--size {args.size} needs {', '.join(missing)}")
        model = load_parts(M.sphinx_config(args.size), args.llm, args.convnext, args.dinov2, args.projector,
                           **overrides)
        return model, args.tokenizer
    return load_released(args.ckpt, dtype=dtype), args.tokenizer or Path(args.ckpt) / "tokenizer.model"
