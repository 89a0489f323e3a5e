"""Safetensors checkpoints: strict loading, atomic saving, and key renaming by rules.

Shared by vision.py (encoders) and loading.py (LLMs, whole Sphinx checkpoints).
Every loader reads one tensor at a time and reports every missing, unexpected or
mis-shaped tensor by name in one CheckpointError.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names every offending tensor."""


def compile_rules(rules):
    """[(source pattern, our name)] with {i}-style integer fields -> compiled regexes.
    A source field named {e} is an expert index: it selects a slot of a stacked tensor."""
    out = []
    for src, dst in rules:
        pat = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(src))
        out.append((re.compile(pat + "$"), dst))
    return out


def map_name(name: str, rules) -> tuple[str, int | None] | None:
    """Our (name, expert slot or None) for a checkpoint name, or None if it is not ours."""
    for pat, dst in rules:
        m = pat.match(name)
        if m:
            g = m.groupdict()
            return dst.format(**g), (int(g["e"]) if g.get("e") else None)
    return None



def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_safetensors(files, select=None):
    """(name, tensor) pairs, one tensor in memory at a time. select(name, shape) -> (dim, start, stop)
    reads only that slice of a tensor from the file (a TP rank's shard), None the whole tensor."""
    from safetensors import safe_open
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                part = select(name, sf.get_slice(name).get_shape()) if select else None
                if part is None:
                    yield name, sf.get_tensor(name)
                else:
                    d, a, b = part
                    yield name, sf.get_slice(name)[(slice(None),) * d + (slice(a, b),)]


def tie_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(second name, first name) of every shared parameter (the output head of a tied model)."""
    first, pairs = {}, []
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((n, first[id(p)]))
        first.setdefault(id(p), n)
    return pairs


def tied_names(model: nn.Module) -> set[str]:
    return {n for n, _ in tie_pairs(model)}


def retie(model: nn.Module, pairs):
    """Share parameters again after to_empty or load_state_dict(assign=True) gave each name its own."""
    for n, src in pairs:
        owner, _, attr = n.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(src))


def _cut_to(shard, name: str, t: torch.Tensor, want, is_expert: bool) -> torch.Tensor:
    """A full tensor cut to this TP rank's part when that gives the wanted shape; else as it is (reported)."""
    if tuple(t.shape) == tuple(want):
        return t
    try:
        cut = shard(name, t, is_expert)
    except ValueError:                                    # does not split: reported by the caller as it is
        return t
    return cut if tuple(cut.shape) == tuple(want) else t


def misfit(where: str, missing, unexpected, misshaped) -> CheckpointError:
    """Every problem of a load, at most 20 names per kind."""
    parts = [f"{where} does not fit the model:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            parts.append(f"  {label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    return CheckpointError("\n".join(parts))


def load_state_strict(model: nn.Module, named_tensors, rename=None, expand=None, dtype=torch.float32,
                      device="cpu", where: str = "checkpoint", shard=None):
    """Load (name, tensor) pairs into a model built on the meta device, checking every key and shape.

    rename(name) -> (our name, expert slot | None) or None for an unknown tensor; expand(our_name,
    tensor) -> [(name, tensor), ...] for packed tensors. shard(our_name, tensor, expert_slot) cuts a full
    tensor that does not fit to this TP rank's part (one not already read as a slice). All problems are
    collected and raised at once in a CheckpointError that names each tensor. Tied weights are expected once.
    """
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    tied = tied_names(model)
    for n in tied:
        expected.pop(n, None)
    state, unexpected, misshaped, seen_slots, bad_shape = {}, [], [], {}, set()
    for src, t in named_tensors:
        target = rename(src) if rename else (src, None)
        if target is None or (target[0] in tied and target[1] is None):
            if target is None and not src.endswith("rotary_emb.inv_freq"):   # old HF files carry this buffer
                unexpected.append(src)
            continue
        name, slot = target
        pieces = expand(name, t) if expand else [(name, t)]
        for name, t in pieces:
            if name not in expected:
                unexpected.append(src)
                continue
            shape = expected[name]
            want = shape[1:] if slot is not None else shape
            if shard is not None:
                t = _cut_to(shard, name, t, want, slot is not None)
            if slot is not None and not 0 <= slot < shape[0]:
                misshaped.append(f"{src}: expert {slot} but the model has {shape[0]}")
            elif tuple(t.shape) != tuple(want):
                bad_shape.add(name)
                misshaped.append(f"{src}: checkpoint {tuple(t.shape)} vs model {tuple(want)}")
            elif slot is None:
                state[name] = t.to(device=device, dtype=dtype)
            else:
                if name not in state:
                    state[name] = torch.empty(shape, dtype=dtype, device=device)
                state[name][slot] = t
                seen_slots.setdefault(name, set()).add(slot)
    for name, slots in seen_slots.items():
        if len(slots) != expected[name][0]:
            missing_slots = sorted(set(range(expected[name][0])) - slots)
            misshaped.append(f"{name}: experts {missing_slots} missing")
    missing = sorted(set(expected) - set(state) - bad_shape)
    if missing or unexpected or misshaped:
        raise misfit(where, missing, unexpected, misshaped)
    ties = tie_pairs(model)
    for n, src in ties:
        state[n] = state.get(src)
    model.load_state_dict(state, strict=True, assign=True)
    retie(model, ties)
    return model


def save_safetensors_atomic(path, tensors: dict, metadata: dict):
    """Write to a temp file beside `path`, fsync, then rename: a crash keeps the previous file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, "tensors_sha256": tensors_sha256(sorted(tensors.items()))}
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())      # mkstemp and save_file make it private (0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _digest_header(name, dtype, shape) -> bytes:
    """What the digest hashes before each tensor's bytes, the same whether it reads tensors or the file."""
    return f"{name}|{dtype}|{tuple(shape)}|".encode()


def tensors_sha256(named) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, given in name order: stored in a
    safetensors file's metadata when we write it, checked when we load it (a file cannot hold its own
    file hash). Streams: one tensor in memory at a time."""
    import hashlib
    h = hashlib.sha256()
    for name, t in named:
        h.update(_digest_header(name, t.dtype, t.shape))
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def verify_safetensors(path, chunk: int = 1 << 22):
    """Refuse a file we wrote whose tensors changed since (files from elsewhere carry no digest). The
    digest of tensors_sha256 is recomputed from the file's bytes in 4 MiB reads: no tensor is built and
    no page of the file stays mapped, so verifying costs no memory, whatever the checkpoint's size."""
    import hashlib
    want = read_safetensors_metadata(path).get("tensors_sha256")
    if not want:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        start = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            e = header[name]
            h.update(_digest_header(name, _ST_DTYPES.get(e["dtype"], e["dtype"]), e["shape"]))
            f.seek(start + e["data_offsets"][0])
            left = e["data_offsets"][1] - e["data_offsets"][0]
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise CheckpointError(f"{path}: truncated (tensor {name} runs past the end of the file)")
                h.update(block)
                left -= len(block)
    if h.hexdigest() != want:
        raise CheckpointError(f"{path}: checksum mismatch, its tensors changed after it was saved (corrupt file?)")


def file_sha256(path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_safetensors_metadata(path) -> dict:
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def unique_state_dict(model: nn.Module) -> dict:
    """state_dict without the second name of a tied weight (safetensors refuses shared storage)."""
    tied = tied_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def config_from_json(text: str, cls):
    d = json.loads(text)
    known = {f.name for f in fields(cls)}
    if set(d) - known:
        raise CheckpointError(f"unknown config fields {sorted(set(d) - known)}")
    return cls(**d)

