"""generate.py: prefill + KV-cache decoding against full forwards (with an image and without), the
compiled step against the eager one, and the sampler."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import tiling as T
from generate import generate, sample_token


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return M.build_sphinx(M.sphinx_config("tiny")).eval()


def test_greedy_generation_equals_full_forward_argmax(tiny_model):
    model = tiny_model
    tiles = T.tile(Image.fromarray((np.random.default_rng(1).random((60, 150, 3)) * 255).astype(np.uint8)), 128, 2)
    prompt = [1, 40, 41, 42, 43]
    got = list(generate(model, prompt, tiles, 12))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor([seq]), [tiles])      # no cache: the whole sequence each time
            seq.append(int(logits[0, -1].argmax()))
    assert got == seq[len(prompt):]
    text_only = list(generate(model, prompt, None, 6))
    with torch.no_grad():
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert text_only == seq[len(prompt):]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_equals_eager(tiny_model):
    """--compile: the same tokens as the eager step, with the image, for answers in two cache buckets."""
    model = tiny_model
    tiles = T.tile(Image.fromarray((np.random.default_rng(2).random((90, 40, 3)) * 255).astype(np.uint8)), 128, 2)
    prompt = [1, 50, 51, 52]
    for n in (10, 200):                           # 10: a 256-position cache; 200: a 512-position one
        assert list(generate(model, prompt, tiles, n, compile=True)) == list(generate(model, prompt, tiles, n))


def test_sampler_greedy_and_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert sample_token(logits, 0.0, 1.0) == 0
    # top-p keeps the smallest set of most likely tokens whose mass reaches p: here {0} alone (p 0.5 < 0.61)
    gen = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, 0.5, gen) for _ in range(50)} == {0}
    probs = logits.softmax(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, 1.0, 1.0, gen) for _ in range(4000)]), minlength=4)
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)
    # p just under the top two tokens' mass: exactly those two are kept, renormalised
    p2 = float(probs[:2].sum()) - 1e-3
    counts = torch.bincount(torch.tensor([sample_token(logits, 1.0, p2, gen) for _ in range(4000)]), minlength=4)
    assert counts[2:].sum() == 0
    torch.testing.assert_close(counts[:2] / 4000, probs[:2] / probs[:2].sum(), atol=0.03, rtol=0)


def test_decode_precision_follows_the_width_and_the_cpu():
    """Decoding is matrix-vector products: bf16 only with bf16 instructions and from d = 1024."""
    yes, no = (lambda: True), (lambda: False)
    assert M.pick_dtype("auto", "cpu", decode_dim=256, has_bf16=yes)[0] == "fp32"
    assert M.pick_dtype("auto", "cpu", decode_dim=2048, has_bf16=yes)[0] == "bf16"
    assert M.pick_dtype("auto", "cpu", decode_dim=2048, has_bf16=no)[0] == "fp32"
