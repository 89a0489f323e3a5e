"""checkpoint.py's rules, directly: renaming, strict loading, atomic saving, digests."""
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import checkpoint as C


def test_rules_rename_and_pick_expert_slots():
    rules = C.compile_rules([("model.layers.{i}.mlp.w.weight", "layers.{i}.ffn.w"),
                             ("model.layers.{i}.experts.{e}.w1.weight", "layers.{i}.ffn.w1")])
    assert C.map_name("model.layers.12.mlp.w.weight", rules) == ("layers.12.ffn.w", None)
    assert C.map_name("model.layers.3.experts.7.w1.weight", rules) == ("layers.3.ffn.w1", 7)
    assert C.map_name("model.layers.x.mlp.w.weight", rules) is None          # {i} is an integer
    assert C.map_name("prefix.model.layers.1.mlp.w.weight", rules) is None    # anchored at the start


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.experts = nn.Parameter(torch.zeros(2, 4, 3))
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.a.weight                       # tied


def test_strict_load_names_every_problem_at_once_and_keeps_ties():
    src = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}
    with torch.device("meta"):
        m = _Toy()
    slots = [("e.0", torch.randn(4, 3)), ("e.1", torch.randn(4, 3))]
    rename = lambda n: (("experts", int(n[-1])) if n.startswith("e.") else (n, None))
    C.load_state_strict(m, list(src.items()) + slots, rename)
    assert torch.equal(m.experts[1], slots[1][1]) and m.head.weight is m.a.weight
    with torch.device("meta"):
        m = _Toy()
    bad = [("a.weight", torch.randn(5, 3)), ("stray", torch.zeros(1)), ("e.0", torch.randn(4, 3))]
    with pytest.raises(C.CheckpointError) as e:
        C.load_state_strict(m, bad, lambda n: None if n == "stray" else rename(n), where="toy.safetensors")
    msg = str(e.value)
    assert "toy.safetensors does not fit the model" in msg and "missing (1): a.bias" in msg
    assert "unexpected (1): stray" in msg and "a.weight: checkpoint (5, 3) vs model (4, 3)" in msg
    assert "experts: experts [1] missing" in msg


def test_atomic_save_keeps_the_previous_file_and_writes_a_digest(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    C.save_safetensors_atomic(path, {"w": torch.ones(3)}, {"format": "x"})
    meta = C.read_safetensors_metadata(path)
    assert meta["format"] == "x" and meta["tensors_sha256"] == C.tensors_sha256([("w", torch.ones(3))])
    C.verify_safetensors(path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~C.current_umask()     # a normal file, not mkstemp's 0600
    import safetensors.torch as st

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save_safetensors_atomic(path, {"w": torch.zeros(3)}, {"format": "x"})
    monkeypatch.undo()
    assert torch.equal(load_file(str(path))["w"], torch.ones(3)) and list(tmp_path.iterdir()) == [path]
    # The digest covers names, dtypes and shapes as well as bytes.
    assert C.tensors_sha256([("w", torch.ones(3))]) != C.tensors_sha256([("v", torch.ones(3))])
    assert C.tensors_sha256([("w", torch.ones(3))]) != C.tensors_sha256([("w", torch.ones(3, dtype=torch.float64))])
    assert C.tensors_sha256([("w", torch.ones(3))]) != C.tensors_sha256([("w", torch.ones(1, 3))])


def test_config_from_json_refuses_unknown_fields():
    from model import ModelConfig
    assert C.config_from_json('{"dim": 8, "n_heads": 2, "n_kv_heads": 1}', ModelConfig).dim == 8
    with pytest.raises(C.CheckpointError, match=r"unknown config fields \['wings'\]"):
        C.config_from_json('{"wings": 2}', ModelConfig)


def test_verify_streams_the_file_and_names_a_changed_or_cut_one(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.bfloat16), "c": torch.tensor([1, 2])}
    C.save_safetensors_atomic(path, tensors, {})
    C.verify_safetensors(path)                        # recomputed from the file's bytes, in name order
    data = bytearray(path.read_bytes())
    data[-1] ^= 1                                     # one bit of the last tensor
    (tmp_path / "x.safetensors").write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match="checksum mismatch"):
        C.verify_safetensors(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(path.read_bytes()[:-4])
    with pytest.raises(C.CheckpointError):
        C.verify_safetensors(tmp_path / "y.safetensors")
