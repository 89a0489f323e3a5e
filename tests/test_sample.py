"""sample.py: the CLI: streaming, drawing, component assembly, MoE options, bad input."""
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import loading as L
import model as M
import sample as S
from tiling import ImageLayout
import world as W
from checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random checkpoint + tokenizer, laid out as train.py writes them."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = M.build_sphinx(M.sphinx_config("tiny"))
    L.save_sphinx(d / "model.safetensors", model)
    src = D.SampleSource([{"path": "synthetic", "ratio": 1}], 0, 128, synthetic=W.synthetic_sample)
    D.train_tokenizer([D.prompt_text(src.next().turns) for _ in range(300)], 2048, d / "tokenizer.json")
    return d


def test_draw_puts_boxes_at_expected_pixels(tmp_path):
    photo = Image.new("RGB", (200, 100), (255, 255, 255))         # 2:1 -> 128 x 64 on a 128 canvas
    S.draw_answer(photo, "the cat [0.25, 0.125, 0.50, 0.375] and a mark [0.75, 0.25]",
                  ImageLayout(128, 2, 17), tmp_path / "o.png")
    px = np.asarray(Image.open(tmp_path / "o.png")).astype(int)
    # canvas (0.25, 0.125)-(0.5, 0.375) = photo (50, 25)-(100, 75)
    for x, y in ((50, 25), (100, 75), (75, 25), (50, 50), (100, 60)):
        assert tuple(px[y, x]) == (255, 0, 0), (x, y)
    assert tuple(px[50, 75]) == (255, 255, 255)                   # inside the box: untouched
    assert tuple(px[50, 150]) == (255, 0, 0)                      # the point (0.75, 0.25) -> (150, 50)


def _run(argv, capsys):
    code = S.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _save(img, path, fmt=None, **kw):
    img.save(path, fmt, **kw)
    return str(path)


def test_images_of_every_kind_work(run_dir, tmp_path, capsys):
    ck = ["--ckpt", str(run_dir / "model.safetensors"), "--max-new-tokens", "4", "--temperature", "0"]
    rgb = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    files = {
        "tiny.png": _save(Image.new("RGB", (1, 1), (5, 5, 5)), tmp_path / "tiny.png"),
        "thin.png": _save(Image.new("RGB", (1, 4000), (5, 5, 5)), tmp_path / "thin.png"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "i16.png": _save(Image.fromarray(np.full((30, 50), 40000, np.uint16)), tmp_path / "i16.png"),
        "palette.png": _save(rgb.convert("P"), tmp_path / "palette.png"),
        "rgba.png": _save(rgb.convert("RGBA"), tmp_path / "rgba.png"),
    }
    for name, path in files.items():
        code, out, err = _run([path, "What is this?"] + ck, capsys)
        dtype_line, rest = err.split("\n", 1)                     # the precision chosen, then nothing
        assert code == 0 and dtype_line.startswith(("(fp32: ", "(bf16: ")) and rest == "", (name, err)
    code, out, err = _run(["What is 2 + 2?"] + ck, capsys)                # text only
    assert code == 0


def test_bad_input_is_one_line_and_nonzero(run_dir, tmp_path, capsys):
    ck = ["--ckpt", str(run_dir / "model.safetensors"), "--max-new-tokens", "2"]
    (tmp_path / "notes.jpg").write_text("not an image")
    jpg = io.BytesIO()
    Image.new("RGB", (300, 200), (9, 90, 200)).save(jpg, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 3])
    Image.new("1", (10_000, 9_500)).save(tmp_path / "bomb.png")
    cases = {
        str(tmp_path / "missing.jpg"): "missing.jpg: no such file",
        str(tmp_path / "notes.jpg"): "notes.jpg: not a readable image",
        str(tmp_path / "cut.jpg"): "cut.jpg: not a readable image",
        str(tmp_path / "bomb.png"): "bomb.png: 10000x9500 pixels exceeds the limit",
    }
    for path, message in cases.items():
        code, out, err = _run([path, "hi"] + ck, capsys)
        assert code == 1 and err.count("\n") == 1 and message in err, err
    code, _, err = _run([str(tmp_path / "cut.jpg"), "hi", "--ckpt", str(tmp_path / "none.safetensors")], capsys)
    assert code == 1 and "cut.jpg" in err
    code, _, err = _run(["hi", "--ckpt", str(tmp_path / "none.safetensors")], capsys)
    assert code == 1 and "no checkpoint at" in err and "torchrun train.py --size tiny" in err
    code, _, err = _run(["hi", "--experts", "2"] + ck, capsys)
    assert code == 1 and "--experts applies to MoE sizes only" in err
    code, _, err = _run(["hi", "--keep-experts", "0,1"] + ck, capsys)
    assert code == 1 and "--keep-experts applies to MoE sizes only" in err
    # through the real command line: exit status and a single line, never a traceback
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(tmp_path / "notes.jpg"), "hi"] + ck,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_chat_keeps_the_conversation(run_dir, tmp_path, capsys, monkeypatch):
    seen = []
    real = S.answer

    def spy(model, tok, turns, tiles, args, out=sys.stdout):
        seen.append(list(turns))
        return real(model, tok, turns, tiles, args, out)
    monkeypatch.setattr(S, "answer", spy)
    questions = iter(["first?", "second?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    img = _save(Image.new("RGB", (64, 32), (1, 2, 3)), tmp_path / "c.png")
    code, out, _ = _run([img, "--chat", "--ckpt", str(run_dir / "model.safetensors"), "--max-new-tokens", "3"], capsys)
    assert code == 0 and len(seen) == 2
    assert seen[1][0][0] == "first?" and seen[1][0][1] is not None and seen[1][1] == ("second?", None)


def test_chat_drops_the_oldest_turn_when_the_context_is_full(run_dir, tmp_path, capsys, monkeypatch):
    questions = iter(["first question?", "second question?", "third question?", "x" * 5000, ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    seen = []
    real = S.answer
    monkeypatch.setattr(S, "answer", lambda model, tok, turns, tiles, args, out=sys.stdout:
                        (seen.append(len(turns)), real(model, tok, turns, tiles, args, out))[1])
    img = _save(Image.new("RGB", (64, 32), (1, 2, 3)), tmp_path / "c.png")
    # Room for one turn (with its image block and the longest answer) but not for two.
    model, tok = L.load_sphinx(run_dir / "model.safetensors"), D.Tokenizer(run_dir / "tokenizer.json")
    tiles = model.layout.tile(Image.open(img))
    one = len(D.prompt_tokens(tok, [("first question?", None)])) + model.layout.block_len(tiles.fully_padded)
    code, _, err = _run([img, "--chat", "--ckpt", str(run_dir / "model.safetensors"), "--temperature", "0",
                         "--max-new-tokens", str(model.llm.cfg.max_seq_len - one - 8)], capsys)
    assert code == 0 and seen == [1, 1, 1]                       # every question answered, alone in the context
    assert err.count("the oldest turn was dropped") == 2 and "that message does not fit the context" in err


def test_assemble_from_component_files(run_dir, tmp_path):
    """A size assembled from an HF LLM directory, HF ConvNeXt/DINOv2 files and a projector file."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    ref = L.load_sphinx(run_dir / "model.safetensors")
    c = ref.cfg.llm
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=True))
    llm.save_pretrained(tmp_path / "llm")
    cn = ref.cfg.convnext
    transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=list(cn.dims), depths=list(cn.depths),
                                                           layer_norm_eps=1e-6)).save_pretrained(tmp_path / "cnx")
    vt = ref.cfg.vit
    transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=vt.dim, num_hidden_layers=vt.depth,
                                                       num_attention_heads=vt.heads, patch_size=vt.patch,
                                                       image_size=vt.patch * vt.pos_grid)).save_pretrained(tmp_path / "dino")
    save_file({k: v for k, v in ref.state_dict().items()
               if k.startswith("mov.proj.") or k in ("begin_of_image", "end_of_image", "skip_token")},
              str(tmp_path / "proj.safetensors"))
    args = S.parse_args(["hi", "--size", "tiny", "--llm", str(tmp_path / "llm"), "--convnext", str(tmp_path / "cnx"),
                         "--dinov2", str(tmp_path / "dino"), "--projector", str(tmp_path / "proj.safetensors"),
                         "--tokenizer", str(run_dir / "tokenizer.json"), "--dtype", "fp32"])
    model, _ = S.load(args)
    assert torch.equal(model.skip_token, ref.skip_token)
    assert torch.equal(model.mov.proj[0].weight, ref.mov.proj[0].weight)
    assert torch.equal(model.llm.layers[0].attention.wq.weight, llm.model.layers[0].self_attn.q_proj.weight)
    assert all(p.device.type == "cpu" for p in model.parameters())      # nothing left on the meta device
    tags = {k: v for k, v in ref.state_dict().items() if k.startswith("mov.proj.") or k in ("begin_of_image", "end_of_image")}
    save_file(tags, str(tmp_path / "proj.safetensors"))                 # the skip token is missing
    with pytest.raises(CheckpointError, match="skip_token"):
        S.load(args)


@pytest.mark.parametrize("flags,message", [(["--top-p", "0"], "--top-p must be in (0, 1]"),
                                           (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
                                           (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 1"),
                                           (["--device", "nonsense"], "is not a device"),
                                           (["--device", "cuda"], "no CUDA GPU")])
def test_sample_cli_misuse_is_one_line(flags, message, capsys):
    if flags[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        S.parse_args(["hi"] + flags)
    assert message in capsys.readouterr().err


def test_keep_experts_prunes_every_moe_layer(run_dir, tmp_path, capsys):
    """--keep-experts (paper App. A.1.3): every layer routes only to the kept experts."""
    torch.manual_seed(0)
    model = M.build_sphinx(M.sphinx_config("tiny-moe"))
    L.save_sphinx(tmp_path / "moe.safetensors", model)
    shutil.copy(run_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    args = S.parse_args(["hi", "--ckpt", str(tmp_path / "moe.safetensors"), "--keep-experts", "1,3", "--dtype", "fp32"])
    pruned, _ = S.load(args)
    capsys.readouterr()
    from moe import moe_layers
    layers = moe_layers(pruned)
    assert layers and all(m.kept_experts.tolist() == [False, True, False, True] for m in layers)
    with torch.no_grad():
        _, _, top_idx = layers[0].route(torch.randn(50, pruned.cfg.llm.dim))
    assert set(top_idx.flatten().tolist()) == {1, 3}
    for bad, message in (("1,x", "expected expert numbers"), ("2", "need at least top_k=2 experts")):
        code, _, err = _run(["hi", "--ckpt", str(tmp_path / "moe.safetensors"), "--keep-experts", bad], capsys)
        assert code == 1 and message in err and err.count("\n") == 1, err


def test_an_image_without_a_prompt_is_refused(run_dir, tmp_path, capsys):
    """python sample.py cat.png: the file name must not become a text-only prompt."""
    photo = _save(Image.new("RGB", (20, 20), (5, 5, 5)), tmp_path / "cat.png")
    code, out, err = _run([photo, "--ckpt", str(run_dir / "model.safetensors")], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and "is an image but there is no prompt" in err


def test_ckpt_takes_a_run_directory_and_names_what_it_expected(run_dir, tmp_path, capsys):
    flags = ["--max-new-tokens", "2", "--temperature", "0"]
    code, out, err = _run(["What is 2 + 2?", "--ckpt", str(run_dir)] + flags, capsys)       # out/tiny as users pass it
    assert code == 0 and "error" not in err
    (tmp_path / "other").mkdir()
    code, out, err = _run(["What is 2 + 2?", "--ckpt", str(tmp_path / "other")] + flags, capsys)
    assert code == 1 and err.count("\n") == 1 and "expected our checkpoint (model.safetensors" in err
