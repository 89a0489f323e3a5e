"""vision.py against HF transformers' ConvNextModel and Dinov2Model (random weights), read in every key layout
(formats/encoders.py), the MoV's grids and projector, DINOv2's position interpolation."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import vision as V
from checkpoint import CheckpointError
from formats.encoders import load_encoder

transformers = pytest.importorskip("transformers")
from hf_oracles import perturb  # noqa: E402  (needs transformers)


_perturb = perturb


@pytest.fixture(scope="module")
def hf_convnext(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1],
                                      layer_norm_eps=1e-6)
    ref = transformers.ConvNextModel(cfg).eval()
    _perturb(ref, 1)
    path = tmp_path_factory.mktemp("convnext")
    ref.save_pretrained(path)
    return ref, path, V.ConvNeXtConfig(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), input_size=None)


@pytest.fixture(scope="module", params=["swiglu", "mlp"])
def hf_dinov2(request, tmp_path_factory):
    torch.manual_seed(0)
    swiglu = request.param == "swiglu"
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                                    patch_size=14, use_swiglu_ffn=swiglu, mlp_ratio=4)
    ref = transformers.Dinov2Model(cfg).eval()
    _perturb(ref, 2)
    path = tmp_path_factory.mktemp("dinov2")
    ref.save_pretrained(path)
    return ref, path, V.ViTConfig(dim=32, depth=2, heads=4, patch=14, pos_grid=4, ffn=request.param)


def _load(module_cls, cfg, path):
    with torch.device("meta"):
        m = module_cls(cfg)
    return load_encoder(m, path).eval()


def test_convnext_matches_hf(hf_convnext):
    ref, path, cfg = hf_convnext
    ours = _load(V.ConvNeXt, cfg, path)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out = ref(x).last_hidden_state
        torch.testing.assert_close(ours.forward_features(x), out, atol=1e-4, rtol=0)
        # Our output is the head LayerNorm on every position of the map (open_clip's trunk.head.norm).
        expected = ref.layernorm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)


def to_timm(hf_path, out):
    """HF ConvNextModel names -> open_clip's `visual.trunk.` (timm) names, written independently of vision.py."""
    sd, res = load_file(str(hf_path / "model.safetensors")), {}
    for k, v in sd.items():
        k2 = (k.replace("embeddings.patch_embeddings", "stem.0").replace("embeddings.layernorm", "stem.1")
               .replace("encoder.stages", "stages").replace("downsampling_layer", "downsample").replace(".layers.", ".blocks.")
               .replace("dwconv", "conv_dw").replace(".layernorm.", ".norm.").replace("pwconv1", "mlp.fc1")
               .replace("pwconv2", "mlp.fc2").replace("layer_scale_parameter", "gamma"))
        if k2.startswith("layernorm."):
            k2 = k2.replace("layernorm.", "head.norm.")
        res["visual.trunk." + k2] = v
    save_file(res, str(out))


def to_dinov2(hf_path, out):
    """HF Dinov2Model names -> the original DINOv2 names (packed attn.qkv, ls1.gamma, mlp.w12/w3)."""
    sd, res = load_file(str(hf_path / "model.safetensors")), {}
    for k, v in sd.items():
        if ".attention.attention." in k:
            continue
        k2 = (k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj").replace("embeddings.cls_token", "cls_token")
               .replace("embeddings.position_embeddings", "pos_embed").replace("embeddings.mask_token", "mask_token")
               .replace("encoder.layer.", "blocks.").replace("attention.output.dense", "attn.proj")
               .replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
               .replace("mlp.weights_in", "mlp.w12").replace("mlp.weights_out", "mlp.w3"))
        res[k2.replace("layernorm.", "norm.") if k2.startswith("layernorm.") else k2] = v
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n):
        for p in ("weight", "bias"):
            res[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"encoder.layer.{i}.attention.attention.{w}.{p}"]
                                                         for w in ("query", "key", "value")])
    save_file(res, str(out))


def test_convnext_timm_layout_same_numbers(hf_convnext, tmp_path):
    ref, path, cfg = hf_convnext
    to_timm(path, tmp_path / "open_clip.safetensors")
    a, b = _load(V.ConvNeXt, cfg, path), _load(V.ConvNeXt, cfg, tmp_path / "open_clip.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_dinov2_matches_hf_at_native_and_interpolated_grid(hf_dinov2, tmp_path):
    ref, path, cfg = hf_dinov2
    ours = _load(V.ViT, cfg, path)
    with torch.no_grad():
        for h, w in ((56, 56), (84, 70), (224, 224)):      # 4x4 native grid, then bicubic interpolation
            x = torch.randn(2, 3, h, w)
            torch.testing.assert_close(ours(x), ref(x).last_hidden_state, atol=1e-4, rtol=0)
    to_dinov2(path, tmp_path / "dinov2.safetensors")
    orig = _load(V.ViT, cfg, tmp_path / "dinov2.safetensors")
    x = torch.randn(1, 3, 70, 42)
    with torch.no_grad():
        assert torch.equal(orig(x), ours(x))


def test_encoder_checkpoint_errors_name_the_tensor(hf_convnext, tmp_path):
    _, path, cfg = hf_convnext
    sd = load_file(str(path / "model.safetensors"))
    sd.pop("encoder.stages.2.layers.0.pwconv1.bias")
    sd["encoder.stages.0.layers.0.dwconv.weight"] = torch.zeros(8, 1, 5, 5)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        _load(V.ConvNeXt, cfg, tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "missing (1): stages.2.blocks.0.fc1.bias" in msg
    assert "encoder.stages.0.layers.0.dwconv.weight: checkpoint (8, 1, 5, 5) vs model (8, 1, 7, 7)" in msg


def test_paper_encoder_param_counts_on_meta():
    # Counted: every parameter of the HF layout (ConvNextModel incl. its final LayerNorm; Dinov2Model incl.
    # mask_token), which our modules hold one-for-one.
    with torch.device("meta"):
        cn, vit = V.ConvNeXt(V.CONVNEXT_CONFIGS["convnext-xxlarge"]), V.ViT(V.VIT_CONFIGS["dinov2-vitg14"])
    assert sum(p.numel() for p in cn.parameters()) == 843_398_016
    assert sum(p.numel() for p in vit.parameters()) == 1_136_480_768
    assert V.VIT_CONFIGS["dinov2-vitg14"].hidden == 4096     # DINOv2's SwiGLU width for ViT-g


def test_mov_aligns_grids_and_projects():
    torch.manual_seed(0)
    mov = V.MixtureOfVisualExperts(V.CONVNEXT_CONFIGS["tiny"], V.VIT_CONFIGS["tiny"], llm_dim=48)
    mov.init_weights()
    mov.freeze_encoders()
    views = torch.rand(3, 3, 64, 64)
    feats = mov.encode_frozen(views)
    c = V.CONVNEXT_CONFIGS["tiny"].dims[-1]
    assert feats.shape == (3, 1 + 4 * 4, c + V.VIT_CONFIGS["tiny"].dim)
    conv = feats[..., :c]
    torch.testing.assert_close(conv[:, 0], conv[:, 1:].mean(1))          # ConvNeXt cls = mean of its grid
    torch.testing.assert_close(feats[..., c:], mov.vit(V.normalize(views, V.IMAGENET_MEAN, V.IMAGENET_STD)))
    out = mov(views)
    assert out.shape == (3, 17, 48)
    torch.testing.assert_close(out, mov.proj(feats))
    out.sum().backward()
    assert mov.proj[0].weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in [*mov.convnext.parameters(), *mov.vit.parameters()])


def test_dinov2_position_interpolation_as_the_original_code():
    # Original DINOv2 (vision_transformer.py, interpolate_pos_encoding): the M x M grid is resized by a
    # scale factor (w0 + 0.1) / M, bicubic, no antialias; transformers resizes to the exact size.
    torch.manual_seed(0)
    cfg = V.ViTConfig(dim=8, depth=1, heads=2, patch=14, pos_grid=37, ffn="mlp", pos_interp="dinov2")
    vit = V.ViT(cfg)
    torch.nn.init.normal_(vit.pos_embed)
    M_, w0 = 37, 224 // 14
    grid = vit.pos_embed[:, 1:].reshape(1, M_, M_, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=((w0 + 0.1) / M_, (w0 + 0.1) / M_), mode="bicubic",
                                           antialias=False).permute(0, 2, 3, 1).reshape(1, w0 * w0, 8)
    got = vit.positions(w0, w0)
    torch.testing.assert_close(got[:, 1:], want, atol=1e-6, rtol=0)
    by_size = V.ViT(V.ViTConfig(**{**cfg.__dict__, "pos_interp": "size"}))
    by_size.pos_embed = vit.pos_embed
    assert (by_size.positions(w0, w0) - got).abs().max() > 1e-3                 # the choice matters
