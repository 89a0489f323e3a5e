"""pretrain.py: the text form, view contents and captions, each objective learns, probes, the shipped base."""
import dataclasses
from argparse import Namespace

import pytest
import torch

import data as D
import loading as L
import model as M
from tools import pretrain as P
from tools import scene_tokens as S
import train as T
import vision as V
import world as W
from checkpoint import CheckpointError
from tiling import tile


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return D.train_tokenizer(P.base_texts(0, 0, 300, 128), 2048, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _scene_sample(task, seed=0):
    i = 0
    while True:
        s = W.synthetic_sample(seed, "train", i, 128)
        if s.task == task and s.truth.get("word") and len(s.truth["objects"]) >= 2:
            return s
        i += 1


def test_text_form_puts_the_scene_where_the_image_goes_and_detection_is_a_copy_of_it():
    s = _scene_sample("detection")
    text = P.text_form(s, 128)
    scene, body = text.split(".\n", 1)
    assert body == "".join(t for t, _ in D.render(s.turns))
    assert body.startswith(D.SYSTEM)
    answer = s.turns[0][1]
    assert scene.startswith(answer) and f"the word {s.truth['word']['text']} [" in scene
    lang = next(x for x in (W.synthetic_sample(0, "train", i, 128) for i in range(100)) if x.image is None)
    assert P.text_form(lang, 128) == "".join(t for t, _ in D.render(lang.turns))


def test_captions_place_what_a_view_shows():
    assert P.caption([]) == "nothing"
    assert P.caption([("red", "circle", [0.0, 0.0, 0.2, 0.2], ""), ("text", "word", [0.7, 0.7, 0.9, 0.9], "CAT")]) == \
        "red circle top left, the word bottom right"


def test_view_batch_leaves_out_fully_padded_views():
    views, contents, nxt = P.view_batch(0, "train", 0, 40, 128, 2)
    assert views.shape == (40, 3, 64, 64) and len(contents) == 40
    n_unpadded = 0
    for i in range(nxt):
        s = W.synthetic_sample(0, "train", i, 128)
        if s.image is not None:
            n_unpadded += sum(not p for p in tile(s.image, 128, 2).fully_padded)
    assert n_unpadded >= 40 > n_unpadded - 5          # stopped at the scene that filled the batch


def _falls(losses, k=4):
    return sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k


def test_llm_objective_learns(tok):
    torch.manual_seed(0)
    llm = M.build(M.llm_config("tiny", n_layers=2))
    args = Namespace(llm_steps=25, llm_batch=8, llm_lr=3e-3, seed=0, log_every=100, llm_start=0, tasks_per_image=1,
                     llm_loss="all", induction_warmup=0, induction_every=0)
    assert _falls(P.train_llm(llm, tok, args, 128, autocast=False, log=lambda *a: None))


def test_clip_and_masked_image_objectives_learn(tok):
    torch.manual_seed(0)
    mov = M.build_sphinx(M.sphinx_config("tiny")).mov
    before = {n: p.clone() for n, p in mov.named_parameters()}
    args = Namespace(convnext_steps=20, vit_steps=20, vis_batch=32, vis_lr=2e-3, seed=0, log_every=100)
    assert _falls(P.train_contrastive(mov, "convnext", tok, args, 128, 2, lambda *a: None))
    assert _falls(P.train_vit(mov, args, 128, 2, lambda *a: None))
    assert all(not p.requires_grad for p in mov.convnext.parameters()) and not mov.vit.training
    same = [n for n, p in mov.named_parameters() if torch.equal(before[n], p)]
    assert same == ["proj.0.weight", "proj.0.bias", "proj.1.weight", "proj.1.bias"]   # the encoders all trained
    assert _falls(P.train_contrastive(mov, "vit", tok, args, 128, 2, lambda *a: None), k=3)   # --vit-objective clip


def test_dense_objective_learns_what_each_cell_shows():
    torch.manual_seed(0)
    mov = M.build_sphinx(M.sphinx_config("tiny")).mov
    args = Namespace(convnext_steps=30, vit_steps=30, vis_batch=32, vis_lr=2e-3, word_weight=3.0, shape_weight=3.0, seed=0,
                     log_every=100)
    for which in ("convnext", "vit"):
        before = {n: p.clone() for n, p in getattr(mov, which).named_parameters()}
        assert _falls(P.train_dense(mov, which, args, 128, 2, lambda *a: None))
        same = [n for n, p in getattr(mov, which).named_parameters() if torch.equal(before[n], p)]
        assert same == ([] if which == "convnext" else ["mask_token"])     # only masked-image training uses it
        assert not any(p.requires_grad for p in getattr(mov, which).parameters())


def test_standardised_outputs_are_the_old_features_standardised_per_channel():
    # The fold into the final LayerNorms is exact: on views it never saw, the new features equal
    # the old ones standardised with the statistics of the views it measured.
    torch.manual_seed(0)
    mov = M.build_sphinx(M.sphinx_config("tiny")).mov
    fresh, _, _ = P.view_batch(0, "train", 500, 24, 128, 2)
    stats, _, _ = P.view_batch(0, "train", 0, 64, 128, 2)
    with torch.no_grad():
        old_stats, old_fresh = mov.encode_frozen(stats), mov.encode_frozen(fresh)
    mean, std = old_stats.flatten(0, 1).mean(0), old_stats.flatten(0, 1).std(0)
    P.standardise_outputs(mov, 0, 128, 2, n_views=64)
    with torch.no_grad():
        new_stats, new_fresh = mov.encode_frozen(stats), mov.encode_frozen(fresh)
    flat = new_stats.flatten(0, 1)
    torch.testing.assert_close(flat.mean(0), torch.zeros(flat.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(flat.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(new_fresh, (old_fresh - mean) / std, atol=1e-4, rtol=1e-4)


def test_patches_are_the_vit_token_order():
    views = torch.rand(2, 3, 64, 64)
    p = P.patches(views, 16)
    assert p.shape == (2, 16, 768)
    torch.testing.assert_close(p[1, 6], views[1, :, 16:32, 32:48].reshape(-1))   # row 1, column 2


def test_linear_probe_reads_labels_planted_in_features():
    # Features that hold the labels (plus noise) must probe near-perfectly; pure noise near chance.
    torch.manual_seed(0)
    labels = torch.randint(0, 8, (600,))
    planted = torch.cat([torch.nn.functional.one_hot(labels, 8).double(), 0.1 * torch.randn(600, 4).double()], 1)
    pred = P.ridge(planted[:400], torch.nn.functional.one_hot(labels[:400], 8).double(), planted[400:]).argmax(1)
    assert (pred == labels[400:]).double().mean() > 0.95
    noise = torch.randn(600, 12).double()
    pred = P.ridge(noise[:400], torch.nn.functional.one_hot(labels[:400], 8).double(), noise[400:]).argmax(1)
    assert (pred == labels[400:]).double().mean() < 0.3


# ----------------------------------------------------------------------------- the shipped base

@pytest.fixture(scope="module")
def base_path():
    if not T.DEFAULT_BASE.exists():
        pytest.fail(f"the shipped base {T.DEFAULT_BASE} is missing: run `python pretrain.py`")
    return T.DEFAULT_BASE


def test_shipped_base_loads_strictly_with_its_tokenizer_and_matches_the_tiny_config(base_path):
    cfg = M.sphinx_config("tiny")
    model = L.load_base(base_path, cfg)
    assert model.cfg == cfg
    summary = L.base_summary(base_path)
    assert summary["recipe"]["llm_steps"] > 0 and "pretrained" in summary["probes"]
    assert summary["probes"]["pretrained"]["convnext"]["word"] > 0.8      # the ConvNeXt reads which word a cell shows
    tok = D.Tokenizer(base_path.parent / "tokenizer.json")
    assert tok.vocab_size <= cfg.llm.vocab_size
    assert base_path.stat().st_size <= 20 * 2 ** 20
    assert {"scene_form_eval", "picture_eval", "projector_fit_r2"} <= set(summary)
    # The base reads pictures before any tuning: low answer loss on held-out questions about them.
    held = [s for s in W.eval_per_task(0, 5, 128) if s.image is not None]
    b = D.collate([D.encode(s, tok, 320, model.layout) for s in held], tok)
    with torch.no_grad():
        _, loss = model(b["tokens"], b["images"], b["targets"])
    assert loss.item() < 1.2                                    # random init: ~ln(2048) = 7.6


def test_base_projector_from_the_file_and_moe_upcycled_exactly(base_path):
    torch.manual_seed(0)
    dense = L.load_base(base_path, M.sphinx_config("tiny"))
    torch.manual_seed(1)
    moe = L.load_base(base_path, M.sphinx_config("tiny-moe"))
    x = torch.randint(0, 700, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(moe.llm(x)[0], dense.llm(x)[0], rtol=1e-5, atol=1e-5)
        assert L.base_has_projector(base_path)          # fitted by the scene-token stage: read, not drawn
        assert torch.equal(moe.mov.proj[0].weight, dense.mov.proj[0].weight) and torch.equal(moe.skip_token, dense.skip_token)
        v = torch.rand(2, 3, 64, 64)
        torch.testing.assert_close(moe.mov.encode_frozen(v), dense.mov.encode_frozen(v), rtol=0, atol=0)


def test_base_refuses_a_mismatched_config_or_a_non_base_file(base_path, tmp_path):
    with pytest.raises(CheckpointError, match="config differs"):
        L.load_base(base_path, M.sphinx_config("tiny", llm=M.llm_config("tiny", n_layers=2)))
    L.save_sphinx(tmp_path / "full.safetensors", M.build_sphinx(M.sphinx_config("tiny")))
    with pytest.raises(CheckpointError, match="not a sphinx-x base"):
        L.load_base(tmp_path / "full.safetensors", M.sphinx_config("tiny"))


def test_the_llm_alone_loads_from_a_base_and_its_init_ignores_the_encoders(base_path):
    cfg = M.sphinx_config("tiny")
    llm = P.base_llm(base_path, cfg.llm)
    whole = L.load_base(base_path, cfg).llm
    assert all(torch.equal(a, b) for a, b in zip(llm.state_dict().values(), whole.state_dict().values()))
    with pytest.raises(ValueError, match="not an LLM of this size"):
        P.base_llm(base_path, M.llm_config("tiny", n_layers=2))
    # --reuse-llm and --reuse-vision rest on this: a full run's LLM starts the same whatever the encoders.
    other = dataclasses.replace(cfg, convnext=V.ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                                                input_size=128))
    torch.manual_seed(3)
    a = M.build_sphinx(cfg).llm
    torch.manual_seed(3)
    b = M.build_sphinx(other).llm
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_a_base_from_reused_parts_records_the_recipes_that_made_them(base_path, tmp_path, monkeypatch):
    shipped = L.base_summary(base_path)
    text_starts, text_batch = [], P.text_batch
    monkeypatch.setattr(P, "text_batch", lambda *a: text_starts.append(a[3]) or text_batch(*a))
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((base_path.parent / "tokenizer.json").read_bytes())
    made_by = shipped["recipe"] | {"llm_steps": 1500, "llm_loss": "answers", "convnext_steps": 5}
    parts = L.load_base(base_path, M.sphinx_config("tiny"))
    L.save_base(other / "tiny.safetensors", parts, shipped | {"recipe": made_by})
    P.main(["--reuse-vision", str(base_path), "--reuse-llm", str(other / "tiny.safetensors"),
            "--out", str(tmp_path / "new"), "--llm-steps", "7", "--scene-steps", "3", "--place-steps", "2", "--eval-per-task", "1",
            "--scene-text-every", "2"])
    # every 2nd step of each phase is a text-form batch, from samples of their own
    assert text_starts == [P.SCENE_TEXT_START + 1 * 32, P.SCENE_TEXT_START + (3 + 1) * 32]
    new = tmp_path / "new" / "tiny.safetensors"
    recipe = L.base_summary(new)["recipe"]
    assert (recipe["llm_steps"], recipe["llm_loss"]) == (1500, "answers")         # the LLM's, not the flags'
    assert recipe["convnext_steps"] == shipped["recipe"]["convnext_steps"]          # the encoders' base's
    # the reused LLM had no scene-token stage: this run's
    assert (recipe["scene_steps"], recipe["place_steps"], recipe["scene_text_every"]) == (3, 2, 2)
    assert L.has_scene_tokens(new) and L.base_has_projector(new)
    # text_form_eval is the LLM stage's (the reused LLM's); the LLM after the scene stage is measured apart.
    assert L.base_summary(new)["text_form_eval"] == shipped["text_form_eval"]
    after = L.base_summary(new)["text_form_after_scene"]
    assert set(after) == set(W.TASKS) and all(0 <= v <= 1 for v in after.values())
    # Reusing that LLM keeps its scene-token stage (and its recipe) and only refits the projector.
    P.main(["--reuse-vision", str(base_path), "--reuse-llm", str(new), "--out", str(tmp_path / "again"),
            "--scene-steps", "9", "--eval-per-task", "1"])
    again = tmp_path / "again" / "tiny.safetensors"
    kept = L.base_summary(again)["recipe"]
    assert (kept["scene_steps"], kept["place_steps"]) == (3, 2)
    assert L.base_summary(again)["text_form_after_scene"] == after                 # the same LLM: carried over
    a, b = L.load_base(new, M.sphinx_config("tiny")), L.load_base(again, M.sphinx_config("tiny"))
    assert torch.equal(a.skip_token, b.skip_token) and torch.equal(a.llm.output.weight, b.llm.output.weight)
    # Without a scene-token stage the base has no projector, and none of the reused base's scene entries.
    P.main(["--reuse-vision", str(base_path), "--reuse-llm", str(other / "tiny.safetensors"),
            "--out", str(tmp_path / "plain"), "--scene-steps", "0"])
    plain = tmp_path / "plain" / "tiny.safetensors"
    assert not L.base_has_projector(plain) and "scene" not in L.base_summary(plain)["losses"]


def test_the_tokenizer_comes_from_the_reused_llm_or_caption_encoders_else_it_is_new(base_path, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "base_texts", lambda seed, start, n, canvas: ["red circle [0.37, 0.05] What is 34 + 10?"] * 20)
    shipped = (base_path.parent / "tokenizer.json").read_bytes()
    cfg, log = M.sphinx_config("tiny"), lambda *a: None
    for n, (llm, vision, objective, copied) in enumerate([(base_path, None, "dense", True), (None, base_path, "dense", False),
                                                           (None, base_path, "clip", True), (None, None, "dense", False)]):
        out = tmp_path / str(n)
        out.mkdir()
        recipe = L.base_summary(base_path)["recipe"] | {"convnext_objective": objective}
        monkeypatch.setattr(P.loading, "base_summary", lambda path: {"recipe": recipe})
        tok = P.tokenizer_for(Namespace(reuse_llm=llm, reuse_vision=vision, seed=0), cfg, out, log)
        assert ((out / "tokenizer.json").read_bytes() == shipped) == copied, (llm, vision, objective)
        if not copied:                                  # a new one, trained on this run's texts
            assert tok.decode(tok.encode("What is 34 + 10?")) == "What is 34 + 10?" and tok.vocab_size < 600


def test_an_existing_base_is_never_overwritten_without_the_flag(tmp_path, capsys):
    (tmp_path / "tiny.safetensors").write_bytes(b"an hour of work")
    with pytest.raises(SystemExit) as e:
        P.main(["--out", str(tmp_path)])
    assert e.value.code == 2 and "exists (hours of work); pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "tiny.safetensors").read_bytes() == b"an hour of work"
    args = P.parse_args(["--out", str(tmp_path), "--overwrite"])
    assert P.refusal(args, M.sphinx_config("tiny")) is None


def test_a_reused_part_must_exist_and_a_reused_tokenizer_must_be_beside_it(tmp_path, monkeypatch):
    cfg, out = M.sphinx_config("tiny"), ["--out", str(tmp_path / "new")]
    missing = P.parse_args(out + ["--reuse-vision", str(tmp_path / "nope.safetensors")])
    assert P.refusal(missing, cfg) == f"--reuse-vision {tmp_path / 'nope.safetensors'}: no such file"
    (tmp_path / "tiny.safetensors").write_bytes(b"a base")
    alone = P.parse_args(out + ["--reuse-llm", str(tmp_path / "tiny.safetensors")])
    assert "no tokenizer.json beside it" in P.refusal(alone, cfg)
    # Reused encoders: only caption-trained ones need their tokenizer.
    encoders = P.parse_args(out + ["--reuse-vision", str(tmp_path / "tiny.safetensors")])
    for objective, refused in (("dense", False), ("clip", True)):
        monkeypatch.setattr(P.loading, "base_summary", lambda path: {"recipe": {"convnext_objective": objective}})
        assert ("--reuse-vision" in (P.refusal(encoders, cfg) or "")) == refused, objective
    (tmp_path / "tokenizer.json").write_text("{}")
    assert P.refusal(alone, cfg) is None and P.refusal(encoders, cfg) is None


def test_lm_batch_puts_the_loss_on_the_answers_only(tok):
    """The LLM stage's answer-only loss: the targets are exactly each answer's tokens ('{a}\\n###'), found in
    the one tokenisation of scene text + conversation; with answers_only=False, every next token."""
    s = next(s for s in (W.synthetic_sample(0, "train", i, 128, tasks_per_image=3) for i in range(50))
             if s.image is not None and len(s.turns) >= 2)
    x, y = P.lm_batch(tok, [s], 128)
    kept = y[0][y[0] != D.IGNORE_INDEX].tolist()
    assert kept == [t for _, a in s.turns for t in tok.encode_segment(" " + a + "\n" + D.SEP)]
    assert tok.decode(x[0].tolist()).startswith(P.scene_prefix(s, 128))
    _, y_all = P.lm_batch(tok, [s], 128, answers_only=False)
    assert int((y_all[0] != D.IGNORE_INDEX).sum()) == x.shape[1] - 1


def test_induction_batches_repeat_and_a_fresh_llm_learns_to_copy(tok):
    """The targets are exactly the repeat of the random sequence; a fresh 2-layer tiny LLM learns to copy it
    (what the shipped LLM, trained long on the world's text alone, could not: docs/results.md)."""
    gen = torch.Generator().manual_seed(0)
    x, y = P.induction_batch(tok, gen, n=4, length=8)
    assert x.shape == (4, 17) and torch.equal(x[:, 1:9], x[:, 9:]) and (x[:, 0] == tok.bos_id).all()
    kept = y != D.IGNORE_INDEX
    assert torch.equal(y[kept].view(4, 7), x[:, 10:]) and not kept[:, :9].any()
    torch.manual_seed(0)
    llm = M.build(M.llm_config("tiny", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256))
    opt = torch.optim.AdamW(llm.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0)
    for _ in range(120):
        x, y = P.induction_batch(tok, gen, n=16, length=12)
        llm(x, targets=y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    x, y = P.induction_batch(tok, gen, n=32, length=12)
    with torch.no_grad():
        pred = llm(x)[0].argmax(-1)
    kept = y != D.IGNORE_INDEX
    assert (pred[kept] == y[kept]).float().mean() > 0.9


def test_place_check_measures_how_far_the_answers_follow_the_boxes_in_the_tokens(monkeypatch, tok):
    # Two stand-in readers through the check's own plumbing (the shift, the parsing, the statistics): one
    # says the first box in the global view's tokens, one says the truth whatever the tokens hold.
    cfg = M.sphinx_config("tiny")
    scene = P.scene_model(cfg, M.build_sphinx(cfg).llm)
    dx = 0.05 + 0.1 * torch.rand(()).item()

    def reads_the_value(net, tok, mesh, samples, prompt_of, log, answers):
        for s in samples:
            cells = prompt_of(s)[1].views[0, 1:, S.BOX]
            box = cells[cells.ne(0).any(-1)][0].tolist()
            answers.append({"answer": "[" + ", ".join(f"{v:.3f}" for v in box) + "]"})
    monkeypatch.setattr(P.train, "evaluate", reads_the_value)
    got = P.place_check(scene, tok, 1000, cfg, per_task=6, dx=dx)
    assert got["answers"] == 6 and got["unchanged"] == 0 and got["mean_move"] == pytest.approx(dx, abs=1e-3)

    def says_the_truth(net, tok, mesh, samples, prompt_of, log, answers):
        answers += [{"answer": s.turns[-1][1]} for s in samples]
    monkeypatch.setattr(P.train, "evaluate", says_the_truth)
    got = P.place_check(scene, tok, 1000, cfg, per_task=6, dx=dx)
    assert (got["mean_move"], got["unchanged"], got["right"], got["median_error"]) == (0, 1, 1, [0, 0, 0, 0])


def test_grounding_selection_tells_picking_the_named_object_from_copying_any(base_path, monkeypatch):
    """Two stand-in LLMs through the measurement's own prompting: one always says the first listed object's
    first number, one the named object's (read off the sample's truth, tokenised apart); the scores must be
    the share of questions whose named object comes first, and 1."""
    tok = D.Tokenizer(base_path.parent / "tokenizer.json")
    seed, per_task = int(torch.randint(0, 10_000, ())), 12
    asked = [s for s in W.eval_per_task(seed, per_task, 128) if s.task == "grounding" and len(s.truth["objects"]) >= 2]
    x0 = lambda s, o: tok.encode(" " + W.format_box(W.photo_to_canvas(o["box"], s.image.size, 128))[:5])[-1]
    named = lambda s: next(o for o in s.truth["objects"] if f"the {o['color']} {o['shape']}." in s.turns[-1][0])

    class Says:
        def __init__(self, pick):
            self.pick, self.prompts = pick, []

        def __call__(self, ids):
            ids = ids[0].tolist()
            self.prompts.append(ids)
            logits = torch.zeros(1, len(ids), tok.vocab_size)
            logits[0, -1, self.pick(ids)] = 1.0
            return logits, None

    first = Says(lambda ids: ids[next(i for i, t in enumerate(ids) if tok.decode([t]) == ".") + 1])
    got = P.grounding_selection(first, tok, seed, 128, per_task)
    assert got["questions"] == len(asked) > 0
    share = sum(x0(s, named(s)) == x0(s, s.truth["objects"][0]) for s in asked) / len(asked)
    assert got["right"] == pytest.approx(share) and share < 1
    assert got["chance"] == pytest.approx(sum(1 / len(s.truth["objects"]) for s in asked) / len(asked))
    # the prompt is the scene as text, the question, and the answer up to its first number
    assert tok.decode(first.prompts[0]).endswith(D.SEP + " Assistant: [0.")
    truth = iter(x0(s, named(s)) for s in asked)
    assert P.grounding_selection(Says(lambda ids: next(truth)), tok, seed, 128, per_task)["right"] == 1.0
    one_object = [s for s in W.eval_per_task(seed, per_task, 128) if len((s.truth or {}).get("objects", [])) < 2]
    monkeypatch.setattr(P.world, "eval_per_task", lambda *a: one_object)
    assert P.grounding_selection(first, tok, seed, 128, per_task) is None      # nothing to select among
