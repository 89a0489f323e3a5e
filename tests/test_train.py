"""train.py: ZeRO-2 and TP on several gloo processes against one process, bad samples, the recipe and
schedule, starts (base, pretrained parts, our checkpoint), evaluation, bf16, the plan."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data as D
import formats.hf as HF
from formats.encoders import load_encoder
import model as M
import train as T
import world as W
from parallel import Mesh
from runs import RunError
from train_runs import COMMON, assert_same, run


@pytest.fixture(scope="module")
def single(tokenizer, tmp_path_factory):
    return run(1, COMMON + ["--steps", "3", "--tokenizer", tokenizer], tmp_path_factory.mktemp("single"), "s")


def test_dp2_zero2_matches_one_process(single, tokenizer, tmp_path):
    dp2 = run(2, COMMON + ["--steps", "3", "--tokenizer", tokenizer], tmp_path, "dp2")
    assert_same(single, dp2)
    assert dp2[0][0]["losses"][0] > dp2[0][0]["losses"][-1] > 0
    # ZeRO-2: each DP rank holds half of the gradient + optimizer state, up to one bucket's padding
    full, half = single[0][0]["state_bytes"], dp2[0][0]["state_bytes"]
    assert abs(half - full / 2) <= 4 * 4 * 2, (full, half)


def test_tp2_matches_one_process(single, tokenizer, tmp_path):
    tp2 = run(2, COMMON + ["--steps", "3", "--tp", "2", "--tokenizer", tokenizer], tmp_path, "tp2")
    assert_same(single, tp2)
    # plan.py counts what the runs hold: fp32 ZeRO-2 state (grad shard + master + moments) per rank.
    from tools import plan as P
    cfg = M.sphinx_config("tiny")
    assert P.plan(cfg, dp=1, tp=1, weight_bytes=4)["zero2_state"] == single[0][0]["state_bytes"]
    assert P.plan(cfg, dp=1, tp=2, weight_bytes=4)["zero2_state"] == tp2[0][0]["state_bytes"]


def test_dp2_tp2_four_processes_match(single, tokenizer, tmp_path):
    assert_same(single, run(4, COMMON + ["--steps", "3", "--tp", "2", "--tokenizer", tokenizer], tmp_path, "dp2tp2"))


def test_tiny_moe_tp2_matches_one_process(tokenizer, tmp_path):
    argv = COMMON + ["--steps", "2", "--tokenizer", tokenizer]
    argv[1] = "tiny-moe"
    assert_same(run(1, argv, tmp_path, "moe1"), run(2, argv + ["--tp", "2"], tmp_path, "moe_tp2"))


def _mostly_bad_data(tmp_path, n_good, n_bad):
    """A JSONL data file whose bad records point at image files that exist but do not decode."""
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lines = [{"image": "good.png" if i < n_good else "bad.png",
              "conversations": [{"from": "human", "value": "<image>What color is it?"}, {"from": "gpt", "value": "Red."}]}
             for i in range(n_good + n_bad)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "mixture.json").write_text(json.dumps({"datasets": [{"path": "data.jsonl", "ratio": 1}]}))
    return str(tmp_path / "mixture.json")


def test_dp2_skipping_bad_samples_never_hangs(tokenizer, tmp_path):
    # 2 good records in 12: some steps leave one rank (or the whole batch) with nothing usable.
    data = _mostly_bad_data(tmp_path, 2, 10)
    argv = COMMON + ["--steps", "4", "--tokenizer", tokenizer, "--data", data, "--bad-input", "skip"]
    infos, _ = run(2, argv, tmp_path, "skip")
    assert len(infos[0]["losses"]) == 4 and infos[0]["losses"] == infos[1]["losses"]


def test_all_samples_bad_stops_with_one_clear_line(tokenizer, tmp_path, capsys):
    data = _mostly_bad_data(tmp_path, 0, 6)
    argv = COMMON + ["--steps", "2", "--tokenizer", tokenizer, "--data", data, "--bad-input", "skip",
                     "--out", str(tmp_path / "run")]
    with pytest.raises(RunError, match="(?s)no usable sample.*skipped 6 bad samples, 40 draws.*not a readable image"):
        T.train(T.parse_args(argv))


def test_init_from_our_checkpoint_takes_its_tokenizer(tokenizer, tmp_path):
    """--init with one of our checkpoints (the final one or a step-N/ one) continues with the tokenizer of
    its run, never a freshly trained one that numbers the tokens differently; without one it stops."""
    import shutil
    from pathlib import Path
    first = tmp_path / "first"
    T.train(T.parse_args(COMMON + ["--steps", "1", "--ckpt-every", "1", "--tokenizer", tokenizer, "--out", str(first)]))
    plain = [a for a in COMMON if a != "--from-scratch"] + ["--steps", "1", "--dtype", "fp32"]
    for init in (first / "model.safetensors", next(first.glob("step-*/model.safetensors"))):
        out = tmp_path / f"from-{init.parent.name}"
        T.train(T.parse_args(plain + ["--init", str(init), "--out", str(out)]))
        assert (out / "tokenizer.json").read_bytes() == Path(tokenizer).read_bytes()
    (tmp_path / "lone").mkdir()
    shutil.copyfile(first / "model.safetensors", tmp_path / "lone" / "model.safetensors")
    with pytest.raises(RunError, match="no tokenizer.json in its run directory; pass the one it was trained with"):
        T.train(T.parse_args(plain + ["--init", str(tmp_path / "lone" / "model.safetensors"), "--out", str(tmp_path / "x")]))


def test_lr_schedule_warmup_then_cosine_to_zero():
    lrs = [T.lr_at(s, 200, 1.0, 0.01) for s in range(200)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and max(lrs) == 1.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 1e-3


def test_unknown_size_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--size", "huge"])
    assert "unknown size 'huge'" in capsys.readouterr().err


def test_image_reliance_swaps_images_within_a_layout(tokenizer, monkeypatch):
    """Own vs another sample's image: different for a model that sees images, equal when the image
    block carries nothing; each 'other' is a different sample with the same skip pattern."""
    torch.manual_seed(0)
    model = M.build_sphinx(M.sphinx_config("tiny")).eval()
    tok = D.Tokenizer(tokenizer)
    mesh = Mesh(rank=0, world=1, dp_rank=0, dp=1, tp_rank=0, tp=1)
    samples = W.eval_samples(0, 24, 128)
    own, other = T.image_reliance(model, tok, mesh, samples)
    assert abs(own - other) > 1e-4 and 0 < own < 20 and 0 < other < 20
    seen = []
    real = model.image_blocks
    monkeypatch.setattr(model, "image_blocks", lambda images: seen.append(images[0]) or [b * 0 for b in real(images)])
    own0, other0 = T.image_reliance(model, tok, mesh, samples)
    assert own0 == other0
    pairs = list(zip(seen[::2], seen[1::2]))                 # (own, other) per evaluated sample
    assert pairs and all(a is not b and a.fully_padded == b.fully_padded for a, b in pairs)


def test_run_ends_with_per_task_evaluation_beside_the_text_only_baseline(tokenizer, tmp_path, capsys):
    res = T.train(T.parse_args(COMMON + ["--steps", "1", "--eval-per-task", "2", "--tokenizer", tokenizer,
                                         "--out", str(tmp_path / "run")]))
    out = capsys.readouterr().out
    printed = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in W.TASKS and "text-only baseline" in line:
            printed[parts[0]] = line
    evaluated = {t for t, (_, n) in res["eval"].items() if n}
    assert evaluated and set(printed) == evaluated
    for task in evaluated:
        right, n = res["eval"][task]
        blind, n_blind = res["text_only_baseline"][task]
        assert n_blind == n and f"({int(right)}/{int(n)}; text-only baseline {blind / n:.1%})" in printed[task]
    assert "image reliance: held-out answer loss" in out
    # Every held-out answer, in held-out order, in the run directory; the scores are their sums.
    rows = [json.loads(l) for l in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    held_out = W.eval_per_task(3, 2, res["model"].cfg.canvas)
    assert [r["sample"] for r in rows] == [s.source for s in held_out]
    assert [(r["question"], r["reference"]) for r in rows] == [s.turns[-1] for s in held_out]
    for task in evaluated:
        assert sum(r["right"] for r in rows if r["task"] == task) == res["eval"][task][0]
        assert all(r["right"] == W.score(task, r["answer"], r["reference"]) for r in rows if r["task"] == task)
    first_wrong = next(r for r in rows if not r["right"])
    assert f"{first_wrong['answer']!r} (right: {first_wrong['reference']!r})" in out


def test_tiny_run_starts_from_the_shipped_base_and_its_fitted_projector(tmp_path):
    out = tmp_path / "from_base"
    argv = [a for a in COMMON if a != "--from-scratch"] + ["--steps", "1", "--lr", "1e-12", "--projector-lr", "1e-12", "--out", str(out)]
    args = T.parse_args(argv)
    assert args.base == str(T.DEFAULT_BASE)
    T.train(args)
    assert (out / "tokenizer.json").read_bytes() == (T.DEFAULT_BASE.parent / "tokenizer.json").read_bytes()
    saved, base = load_file(str(out / "model.safetensors")), load_file(str(T.DEFAULT_BASE))
    own = {k: v for k, v in base.items() if not k.startswith("scene_tokens.")}   # pretrain.py's, not the model's
    assert {"skip_token", "begin_of_image", "mov.proj.0.weight"} <= set(own) and set(saved) == set(own)
    for k, v in own.items():                                   # one step at lr 1e-12: still the base
        torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-6)


def test_a_missing_base_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--size", "tiny", "--base", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err
    assert "no base at" in err and "python -m tools.pretrain" in err


def test_paper_start_from_pretrained_parts_with_epochs(tmp_path, monkeypatch, capsys):
    # Item: the paper's recipe starts from a pretrained HF LLM and the two pretrained encoders, with a
    # fresh projector; random toy parts written by transformers' save_pretrained stand in for them.
    import transformers
    import loading as L
    import vision as V
    torch.manual_seed(0)
    llm_cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    transformers.LlamaForCausalLM(llm_cfg).save_pretrained(tmp_path / "llm")
    transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                                           layer_norm_eps=1e-6)).save_pretrained(tmp_path / "convnext")
    transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       image_size=56, patch_size=14, mlp_ratio=4)).save_pretrained(tmp_path / "dinov2")
    cfg = M.SphinxConfig(M.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=176),
                         V.ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), input_size=128),
                         V.ViTConfig(dim=32, depth=2, heads=4, patch=14, pos_grid=4, ffn="mlp"), canvas=112, grid=2)
    monkeypatch.setitem(M.SIZES, "toy-paper", lambda: cfg)
    tok = tmp_path / "tokenizer.json"
    D.train_tokenizer(T.tokenizer_corpus(0, 128, n=200), 512, tok)
    from PIL import Image
    Image.new("RGB", (90, 40), (20, 200, 30)).save(tmp_path / "img.png")
    rec = {"image": "img.png", "conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Green."}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    (tmp_path / "mix.json").write_text(json.dumps({"datasets": [{"path": "d.jsonl", "ratio": 1}]}))
    argv = ["--size", "toy-paper", "--dtype", "fp32", "--llm", str(tmp_path / "llm"), "--convnext", str(tmp_path / "convnext"),
            "--dinov2", str(tmp_path / "dinov2"), "--tokenizer", str(tok), "--data", str(tmp_path / "mix.json"),
            "--batch", "2", "--micro-batch", "1", "--max-len", "320", "--epochs", "2", "--eval-per-task", "0",
            "--out", str(tmp_path / "run")]
    res = T.train(T.parse_args(argv))
    assert len(res["losses"]) == 3 and "2 epoch(s) of 3 records at batch 2 = 3 steps" in capsys.readouterr().out
    model = res["model"]
    ref = HF.load_hf(tmp_path / "llm")
    # The encoders are the given ones, frozen; the LLM trained away from its start; the projector is fresh.
    hf_vit = load_encoder(M.build_sphinx(cfg, init=False).mov.vit, tmp_path / "dinov2")
    assert torch.equal(model.mov.vit.blocks[0].qkv.weight, hf_vit.blocks[0].qkv.weight)
    assert not torch.equal(model.llm.layers[0].attention.wq.weight, ref.layers[0].attention.wq.weight)
    with pytest.raises(SystemExit):
        T.parse_args(argv[:4] + ["--tokenizer", str(tok)])      # --llm without the encoders
    with pytest.raises(SystemExit):
        T.parse_args(["--size", "sphinx-tiny"])                 # synthetic data and no --steps


def test_corrupt_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        D.Tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("flag,value,message", [("--micro-batch", "0", "--micro-batch must be > 0"),
                                                ("--log-every", "0", "--log-every must be > 0"),
                                                ("--steps", "-3", "--steps must be >= 0"),
                                                ("--lr", "-1e-3", "--lr must be > 0"),
                                                ("--ckpt-every", "-1", "--ckpt-every must be >= 0")])
def test_cli_misuse_is_one_line(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--size", "tiny", f"{flag}={value}"])
    assert message in capsys.readouterr().err


def test_bf16_training_follows_fp32(tokenizer, tmp_path):
    # bf16 weights and activations, fp32 master weights, moments and loss: the first losses agree with
    # the fp32 run within bf16's precision, and the step keeps its master copy in fp32.
    argv = COMMON + ["--steps", "4", "--tokenizer", tokenizer, "--device", "cpu"]
    fp32 = T.train(T.parse_args(argv + ["--out", str(tmp_path / "a"), "--dtype", "fp32"]))
    bf16 = T.train(T.parse_args(argv + ["--out", str(tmp_path / "b"), "--dtype", "bf16"]))
    assert bf16["model"].llm.tok_embeddings.weight.dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for m in bf16["opt"].master)
    a, b = torch.tensor(fp32["losses"]), torch.tensor(bf16["losses"])
    assert ((a - b).abs() / a).max() < 0.03, (a, b)
    model = T.loading.load_sphinx(tmp_path / "b" / "model.safetensors")
    assert model.llm.tok_embeddings.weight.dtype == torch.float32      # loaded in the dtype asked for


def _flop_counter(size, tmp_path):
    """(count, shapes, llm config, model): count(path) is what train.flops_per_token counts for one bf16
    micro-batch of `size` with its MoE layers on `path`; shapes, the LLM inputs seen (batch, positions, dim)."""
    args = T.parse_args(["--size", size, "--out", str(tmp_path / size), "--dtype", "bf16"])
    mesh, cfg = Mesh(0, 1, 0, 1, 0, 1), M.sphinx_config(size)
    sphinx = T.build_model(args, mesh, cfg, "bf16")
    opt = T.ZeRO2([(n, p) for n, p in sphinx.named_parameters() if p.requires_grad], mesh, 1e-3)
    tok = D.Tokenizer(T.DEFAULT_BASE.parent / "tokenizer.json")
    src = D.SampleSource([{"path": "synthetic", "ratio": 1}], 3, cfg.canvas, synthetic=W.synthetic_sample)
    b = D.Batcher(src, tok, sphinx.layout, 320, 8, rank=0, world=1).next_micro(1)[0]
    shapes = []
    sphinx.llm.layers[0].register_forward_hook(lambda m, inp, out: shapes.append(inp[0].shape))

    def count(path="auto"):
        for layer in sphinx.llm.layers if cfg.llm.n_experts else []:
            layer.feed_forward.path = path
        return T.flops_per_token(sphinx, opt, b) * b["n_tokens"]
    return count, shapes, cfg.llm, sphinx


def test_mfu_counts_the_experts_whichever_path_the_chooser_picks(tmp_path):
    # tiny-moe differs from tiny only in its FFNs: top-2 of 4 SwiGLU experts (18 d f FLOPs per position
    # forward + backward each) and a router (6 d E) instead of one SwiGLU. Its count adds exactly that on
    # torch._grouped_mm and on the loop (addmm_); "auto" counts what the path it picked counts, without
    # the chooser's timing runs on a shape it meets for the first time.
    count_dense, dense_shapes, _, _ = _flop_counter("tiny", tmp_path)
    dense = count_dense()
    count, shapes, c, sphinx = _flop_counter("tiny-moe", tmp_path)
    grouped = count("grouped")
    assert shapes[-1] == dense_shapes[-1]
    extra = c.n_layers * shapes[-1][0] * shapes[-1][1] * ((c.top_k - 1) * 18 * c.dim * c.ffn_dim + 6 * c.dim * c.n_experts)
    assert grouped == count("loop") == dense + extra
    chooser = sphinx.llm.layers[0].feed_forward.chooser
    chooser.best.clear()
    auto = count("auto")
    assert len(chooser.best) == 1 and auto == count(next(iter(chooser.best.values())))


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_default_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert T.parse_args(["--size", "tiny", "--steps", "1"]).device == expected


def test_mps_without_an_apple_gpu_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        T.parse_args(["--size", "tiny", "--steps", "1", "--device", "mps"])
    assert "no Apple GPU" in capsys.readouterr().err


def test_help_shows_each_sizes_recipe_and_steps_zero_says_why(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "tiny       steps 1400, batch 16, micro-batch 8, lr 0.0001, projector-lr 0.003, max-len 320" in out
    with pytest.raises(SystemExit):
        T.parse_args(["--size", "tiny", "--steps", "0"])
    err = capsys.readouterr().err
    assert "--steps 0 means 'from --epochs', which needs --data mixture.json" in err and "give --steps N > 0" in err


def test_the_core_imports_and_runs_without_the_wings(tmp_path):
    """The paper's files alone (no formats/, no tools/): every core module imports, and a model runs."""
    import shutil
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    for f in root.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    code = ("import model, vision, moe, tiling, data, train, sample, generate, zero, runs\n"
            "import torch\n"
            "m = model.build_sphinx(model.sphinx_config('tiny'))\n"
            "print(m(torch.tensor([[1, 2, 3]]))[0].shape)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "torch.Size([1, 3, 2048])" in res.stdout, res.stderr[-2000:]
    assert not (tmp_path / "formats").exists() and not (tmp_path / "tools").exists()


def test_eval_every_records_held_out_curves_and_draws_the_run(tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    T.train(T.parse_args(COMMON + ["--tokenizer", tokenizer, "--out", str(out), "--steps", "2", "--eval-every", "1",
                                   "--eval-subset", "1", "--eval-per-task", "1"]))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2, 2] and evals[-1]["final"]
    assert all(set(r["eval"]) == set(W.TASKS) and 0 < r["reliance"] < 5 for r in evals)
    assert "step     1 held-out (first 1 per task): caption" in capsys.readouterr().out
    from PIL import Image
    with Image.open(out / "run.png") as img:
        assert img.size == (760, 520) and len(set(img.convert("L").tobytes())) > 3      # axes, curves, labels


def test_eval_only_reports_on_a_checkpoint_and_writes_nothing(tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    T.train(T.parse_args(COMMON + ["--tokenizer", tokenizer, "--out", str(out), "--steps", "1"]))
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    T.main(["--size", "tiny", "--init", str(out / "model.safetensors"), "--eval-only", "--eval-per-task", "1",
            "--out", str(out)])
    text = capsys.readouterr().out
    assert f"evaluating {out / 'model.safetensors'}" in text and "held-out accuracy" in text and "image reliance" in text
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(SystemExit):
        T.parse_args(["--size", "tiny", "--eval-only"])
