import os
import sys
from pathlib import Path

# The Triton interpreter must be chosen before any kernel is decorated (moe.py imports triton).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """A small HF Llama with random weights (GQA, RoPE theta 5e4), saved: (model, directory)."""
    pytest.importorskip("transformers")
    from hf_oracles import make_hf_llama
    path = tmp_path_factory.mktemp("llama")
    return make_hf_llama(path), path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the synthetic corpus (what a from-scratch tiny run trains), as a path."""
    import data as D
    import train as T
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    D.train_tokenizer(T.tokenizer_corpus(0, 128, n=300), 2048, path)
    return str(path)
