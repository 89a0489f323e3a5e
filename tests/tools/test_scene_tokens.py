"""scene_tokens.py: the per-cell truth, the scene's cells as an image block, the projector fitted to them,
and a base that carries that projector."""
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

import data as D
import loading as L
import model as M
from tools import pretrain as P
from tools import scene_tokens as S
import world as W

CFG = M.sphinx_config("tiny")


def _scene_sample(seed=4):
    i = 0
    while True:
        s = W.synthetic_sample(seed, "train", i, 128)
        if s.image is not None and s.truth.get("word") and len(s.truth["objects"]) >= 2:
            return s
        i += 1


def test_view_contents_map_canvas_boxes_into_each_view():
    s = _scene_sample()
    contents = S.view_contents(s, 128, 2)
    assert len(contents) == 5 and len(contents[0]) == len(s.truth["objects"]) + 1
    assert ("text", "word", s.truth["word"]["text"]) in [(c, sh, t) for c, sh, _, t in contents[0]]
    for colour, shape, b, _ in contents[0]:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        v = 1 + 2 * int(cy * 2) + int(cx * 2)                 # the sub-image holding this centre
        match = [x for x in contents[v] if x[:2] == (colour, shape)]
        assert len(match) == 1
        sub = match[0][2]
        assert sub[0] == pytest.approx(b[0] * 2 - int(cx * 2)) and sub[3] == pytest.approx(b[3] * 2 - int(cy * 2))


def test_cell_labels_name_what_covers_each_cell_centre():
    col, shp, wrd, box = S.cell_labels([[("red", "circle", [0.0, 0.0, 0.3, 0.3], "")]], 4)
    assert col.tolist()[:2] == [S.COLOURS.index("red"), 0] and shp[0] == S.SHAPES.index("circle")
    assert box[0].tolist() == pytest.approx([0.0, 0.0, 0.3, 0.3]) and box[1].abs().sum() == 0 and wrd.sum() == 0
    # A thing smaller than a cell covers no cell centre: the cell holding its centre names it.
    col, shp, wrd, box = S.cell_labels([[("text", "word", [0.55, 0.30, 0.70, 0.45], "KEY")]], 4)
    assert torch.nonzero(shp).flatten().tolist() == [1 * 4 + 2]
    assert wrd[6] == S.TEXTS.index("KEY") and col[6] == S.COLOURS.index("text")
    assert box[6].tolist() == pytest.approx([0.55, 0.30, 0.70, 0.45])


def test_place_code_is_a_gaussian_bump_per_coordinate_peaking_in_its_bin():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    box = torch.rand(64, 4, generator=g, dtype=torch.float64)
    code = S.place_code(box).view(64, 4, S.BOX_BINS)
    k = S.BOX_BINS
    want = [[[math.exp(-0.5 * ((b - (i + 0.5) / k) * k) ** 2) for i in range(k)] for b in row] for row in box.tolist()]
    torch.testing.assert_close(code, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(code.argmax(-1), (box * k).floor().long())         # the peak is the coordinate's bin
    assert S.place_code(torch.zeros(3, 4)).abs().sum() == 0                # the background's box: no code
    edge = S.place_code(torch.tensor([0.0, 0.0, 0.3, 0.4])).view(4, k)     # a thing in the corner: coded
    assert edge[0].argmax() == 0 and edge[0, 0] == pytest.approx(math.exp(-0.125))


def test_cell_attributes_are_one_hots_the_box_and_its_place_code_with_the_mean_first():
    contents = [[("green", "square", [0.5, 0.5, 1.0, 1.0], "")], []]
    a = S.cell_attributes(contents, 4)
    assert a.shape == (2, 17, S.N_ATTRIBUTES)
    cell = a[0, 1 + 3 * 4 + 3]                              # bottom-right cell of view 0
    nc, ns, nw = len(S.COLOURS), len(S.SHAPES), len(S.TEXTS)
    box = slice(nc + ns + nw, nc + ns + nw + 4)
    assert cell[:nc].argmax() == S.COLOURS.index("green") and cell[nc:nc + ns].argmax() == S.SHAPES.index("square")
    assert cell[nc + ns:nc + ns + nw].argmax() == 0 and cell[box].tolist() == [0.5, 0.5, 1.0, 1.0]
    torch.testing.assert_close(cell[S.PLACE_CODE], S.place_code(torch.tensor([0.5, 0.5, 1.0, 1.0])))
    assert box.stop == S.PLACE_CODE.start and S.PLACE_CODE.stop == S.N_ATTRIBUTES
    assert a[0, 1][0] == 1 and a[0, 1][box.start:].abs().sum() == 0        # top-left: background
    assert sorted(set(a[:, 1:, :nc].sum(-1).flatten().tolist())) == [1.0]   # exactly one colour per cell
    torch.testing.assert_close(a[:, 0], a[:, 1:].mean(1))
    assert a[1, 1:, 0].eq(1).all()                                          # an empty view: all background


def test_scene_tokens_fill_the_image_block_of_the_real_layout():
    torch.manual_seed(0)
    real = M.build_sphinx(CFG)
    scene = S.scene_model(CFG, real.llm)
    assert scene.llm is real.llm
    s = _scene_sample()
    tok = D.Tokenizer(L.tokenizer_beside(P.train.DEFAULT_BASE) or P.train.DEFAULT_BASE.parent / "tokenizer.json")
    e_real, e_scene = D.encode(s, tok, 320, real.layout), S.encode_scene(s, tok, 320, scene.layout, 4)
    assert e_scene.tokens == e_real.tokens and e_scene.image_tokens == e_real.image_tokens
    assert e_scene.tiles.fully_padded == e_real.tiles.fully_padded
    block = scene.image_blocks([e_scene.tiles])[0]
    want, k = [], 0
    attrs = S.cell_attributes(S.view_contents(s, 128, 2), 4)
    for v, padded in enumerate(e_scene.tiles.fully_padded):
        if padded:
            want.append(scene.skip_token[None])
        else:
            want += [scene.begin_of_image[None], scene.mov.proj(attrs[v]), scene.end_of_image[None]]
    torch.testing.assert_close(block, torch.cat(want))
    assert len(block) == real.image_blocks([e_real.tiles])[0].shape[0]


def test_scene_tokens_without_the_place_code_zero_its_inputs_and_it_joins_at_zero():
    torch.manual_seed(0)
    s = _scene_sample()
    st = S.SceneTokens(CFG.llm.dim, CFG.vit.patch)
    st.init_weights()
    tiles = S.scene_tiles(s, M.build_sphinx(CFG).layout.tile(s.image), 4)
    enc = [[not p for p in tiles.fully_padded]]
    views = torch.stack([v for v, e in zip(tiles.views, enc[0]) if e])
    assert views[..., S.PLACE_CODE].abs().sum() > 0
    with torch.no_grad():
        on = st.encode_images([tiles], enc)
        st.place_code = False
        torch.testing.assert_close(st.encode_images([tiles], enc), on, rtol=0, atol=0)   # its weights start at zero
        st.proj[0].weight.normal_()
        off = st.encode_images([tiles], enc)
        torch.testing.assert_close(off, st.proj(views.index_fill(-1, torch.arange(S.PLACE_CODE.start, S.N_ATTRIBUTES), 0)))
        st.place_code = True
        assert not torch.allclose(st.encode_images([tiles], enc), off, atol=1e-3)
    assert tiles.views[..., S.PLACE_CODE].abs().sum() > 0                  # the caller's tiles are untouched


def test_shifted_boxes_move_every_things_box_and_its_place_code_in_x_only():
    s = _scene_sample()
    views = S.cell_attributes(S.view_contents(s, 128, 2), 4)
    dx = 0.1 + 0.2 * torch.rand(()).item()
    out = S.shift_boxes(views, dx)
    thing = views[:, 1:, S.BOX].ne(0).any(-1)
    assert thing.any() and (~thing).any()
    want = views[:, 1:, S.BOX].double() + thing[..., None] * torch.tensor([dx, 0, dx, 0], dtype=torch.float64)
    torch.testing.assert_close(out[:, 1:, S.BOX].double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 1:, S.PLACE_CODE], S.place_code(out[:, 1:, S.BOX]))
    assert out[:, 1:, S.PLACE_CODE][~thing].abs().sum() == 0                     # the background has no place
    torch.testing.assert_close(out[..., :S.BOX.start], views[..., :S.BOX.start], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(1))


def test_shuffled_cells_are_a_fresh_permutation_per_view_with_the_mean_token_first():
    torch.manual_seed(0)
    views = torch.randn(6, 17, 5)
    out = S.shuffle_cells(views, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[:, 0], views[:, 0], rtol=0, atol=0)
    orders = []
    for v in range(6):        # each output cell is one input cell, each input cell used once
        match = (out[v, 1:, None] == views[v, None, 1:]).all(-1)
        assert match.sum(1).eq(1).all() and match.sum(0).eq(1).all()
        orders.append(tuple(match.int().argmax(1).tolist()))
    assert len(set(orders)) == 6 and orders[0] != tuple(range(16))
    st = S.SceneTokens(8, 16)
    st.init_weights()
    s = _scene_sample()
    tiles = S.scene_tiles(s, M.build_sphinx(CFG).layout.tile(s.image), 4)
    enc = [[not p for p in tiles.fully_padded]]
    kept = tiles.views.clone()
    with torch.no_grad():
        st.shuffle = torch.Generator().manual_seed(2)
        got = st.encode_images([tiles], enc)
        views = torch.stack([v for v, e in zip(tiles.views, enc[0]) if e])
        torch.testing.assert_close(got, st.proj(S.shuffle_cells(views, torch.Generator().manual_seed(2))))
    torch.testing.assert_close(tiles.views, kept, rtol=0, atol=0)          # the caller's tiles are untouched


def test_a_scene_projector_made_before_the_place_code_reads_it_with_zero_weights(tmp_path):
    torch.manual_seed(0)
    src = M.build_sphinx(CFG)
    old = S.scene_model(CFG, src.llm)
    narrow = old.mov.proj[0] = torch.nn.Linear(S.N_ATTRIBUTES - S.PLACE_WIDTH, CFG.llm.dim)
    L.save_base(tmp_path / "old.safetensors", src, {"recipe": {}}, old.mov.proj)
    again = S.scene_model(CFG, src.llm)
    assert P.load_reused_scene(tmp_path / "old.safetensors", again) is False
    x = torch.randn(5, S.N_ATTRIBUTES)
    with torch.no_grad():
        torch.testing.assert_close(again.mov.proj(x), old.mov.proj[1](narrow(x[:, :S.PLACE_CODE.start])))
    torch.testing.assert_close(again.skip_token, src.skip_token, rtol=0, atol=0)
    L.save_base(tmp_path / "new.safetensors", src, {"recipe": {}}, again.mov.proj)
    third = S.scene_model(CFG, src.llm)
    assert P.load_reused_scene(tmp_path / "new.safetensors", third) is True
    torch.testing.assert_close(third.mov.proj[0].weight, again.mov.proj[0].weight, rtol=0, atol=0)


def test_fit_projector_composes_the_regression_with_the_scene_projector():
    # Attributes that are an exact affine function of the encoders' tokens: the fitted projector must map
    # every view exactly where the scene projector maps its attributes.
    torch.manual_seed(0)
    real = M.build_sphinx(CFG)
    scene_proj = S.SceneTokens(CFG.llm.dim, 16).proj
    torch.nn.init.normal_(scene_proj[0].weight, std=0.3)
    torch.nn.init.normal_(scene_proj[1].weight, mean=1.0, std=0.1)
    views = torch.rand(64, 3, 64, 64)
    feats = real.mov.encode_frozen(views).double()
    mix = torch.randn(feats.shape[-1], S.N_ATTRIBUTES, dtype=torch.float64)
    attrs = feats @ mix + torch.randn(S.N_ATTRIBUTES, dtype=torch.float64)
    r2 = S.fit_projector(real.mov, scene_proj, views, attrs.float(), lam=1e-9)
    assert min(r2.values()) > 0.999
    with torch.no_grad():
        torch.testing.assert_close(real.mov(views), scene_proj(attrs.float()), rtol=1e-3, atol=1e-3)
        assert not torch.allclose(real.mov(views), scene_proj(attrs.float() + 0.5), atol=1e-2)


def test_scene_stage_trains_the_llm_projector_tags_and_skip_token_then_the_place_code(monkeypatch):
    torch.manual_seed(0)
    tok = D.Tokenizer(P.train.DEFAULT_BASE.parent / "tokenizer.json")
    scene = S.scene_model(CFG, M.build_sphinx(CFG).llm)
    before = {n: p.detach().clone() for n, p in scene.named_parameters() if p.requires_grad}
    args = Namespace(seed=0, scene_steps=6, place_steps=3, scene_batch=4, scene_lr=1e-3, log_every=100, scene_text_every=0)
    losses = P.train_scene(scene, tok, args, CFG, autocast=False, log=lambda *a: None)
    assert len(losses) == 6 and all(l == l for l in losses)
    moved = {n for n, p in scene.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert {"mov.proj.0.weight", "begin_of_image", "end_of_image", "llm.layers.0.attention.wq.weight"} <= moved
    assert scene.mov.proj[0].weight[:, S.PLACE_CODE].abs().sum() == 0        # first without the place code
    assert scene.mov.shuffle is None                                       # and with the cells in order
    seen, real_sample = [], W.synthetic_sample
    monkeypatch.setattr(P.world, "synthetic_sample", lambda *a: seen.append(a) or real_sample(*a))
    losses = P.train_scene(scene, tok, args, CFG, autocast=False, log=lambda *a: None, place=True)
    assert len(losses) == 3 and scene.mov.place_code and scene.mov.proj[0].weight[:, S.PLACE_CODE].abs().sum() > 0
    assert scene.mov.shuffle is not None                                   # its cells came shuffled
    assert seen[0] == (0, "train", P.SCENE_START + 24, 128, P.PLACE_TASKS) and len(seen) == 12  # new scenes
    used = [W.synthetic_sample(0, "train", i, 128) for i in range(P.SCENE_START, P.SCENE_START + 24)]
    padded = any(any(scene.layout.tile(s.image).fully_padded) for s in used if s.image is not None)
    assert ("skip_token" in moved) == padded          # it learns exactly when a view was only padding


def test_a_base_with_a_fitted_projector_loads_it_and_its_scene_parts(tmp_path):
    torch.manual_seed(0)
    src = M.build_sphinx(CFG)
    scene = S.scene_model(CFG, src.llm)
    path = tmp_path / "tiny.safetensors"
    L.save_base(path, src, {"recipe": {}}, scene.mov.proj)
    assert L.base_has_projector(path)
    for size in ("tiny", "tiny-moe"):
        torch.manual_seed(1)
        got = L.load_base(path, M.sphinx_config(size))
        for name in ("mov.proj.0.weight", "mov.proj.1.bias", "skip_token", "begin_of_image"):
            torch.testing.assert_close(got.get_parameter(name), src.get_parameter(name), rtol=0, atol=0)
    again = S.scene_model(CFG, src.llm)
    L.load_scene_parts(path, again)
    for name in ("mov.proj.0.weight", "mov.proj.1.weight"):          # the scene stage's own projector
        torch.testing.assert_close(again.get_parameter(name), scene.get_parameter(name), rtol=0, atol=0)
    torch.testing.assert_close(again.end_of_image, src.end_of_image, rtol=0, atol=0)   # the tags both share
    plain = tmp_path / "plain.safetensors"
    L.save_base(plain, src, {"recipe": {}})
    assert not L.base_has_projector(plain)
    torch.manual_seed(1)
    a = L.load_base(plain, CFG)
    torch.manual_seed(2)
    b = L.load_base(plain, CFG)
    assert not torch.equal(a.mov.proj[0].weight, b.mov.proj[0].weight)      # no projector stored: fresh per seed
    torch.testing.assert_close(a.llm.output.weight, src.llm.output.weight, rtol=0, atol=0)
    with pytest.raises(L.CheckpointError, match="no scene-token stage"):
        L.load_scene_parts(plain, again)
