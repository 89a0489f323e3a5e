"""vision.py against HF transformers' ConvNextModel and Dinov2Model (random weights), in every key layout."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import vision as V

transformers = pytest.importorskip("transformers")


def _perturb(model, seed):
    # HF inits LayerNorms to (1, 0) and layer scales to constants: perturb all so each one matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


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
    return V.load_encoder(m, path).eval()


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
    with pytest.raises(V.CheckpointError) as e:
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


def test_reference_views_and_renormalisation():
    # llama_ens5_light's encode_image: ConvNeXt gets the canvas resized then its four quadrants unchanged;
    # DINOv2 gets CLIP-normalised pixels re-expressed in ImageNet statistics.
    torch.manual_seed(0)
    mov = V.MixtureOfVisualExperts(V.ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), input_size=None),
                                   V.ViTConfig(dim=16, depth=1, heads=2, patch=14, pos_grid=4, ffn="mlp"), 32)
    mov.init_weights()
    seen = {}
    conv_fwd, vit_fwd = mov.convnext.forward, mov.vit.forward
    mov.convnext.forward = lambda x: (seen.setdefault("conv", x), conv_fwd(x))[1]
    mov.vit.forward = lambda x, mask=None: (seen.setdefault("vit", x), vit_fwd(x))[1]
    canvas = torch.rand(1, 3, 1024, 1024)
    out = mov.reference_tokens(canvas)
    assert out.shape == (5, 1 + 16 * 16, 32 + 16)
    clip = (canvas - torch.tensor(V.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(V.CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(seen["conv"][2], clip[0, :, :512, 512:]) and torch.equal(seen["conv"][4], clip[0, :, 512:, 512:])
    assert seen["conv"].shape == (5, 3, 512, 512) and seen["vit"].shape == (5, 3, 224, 224)
    # A canvas of one colour: DINOv2's input is that colour in ImageNet statistics (half-precision resizes).
    flat = torch.ones(1, 3, 1024, 1024) * torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    seen.clear()
    mov.reference_tokens(flat)
    want = (torch.tensor([0.2, 0.5, 0.9]) - torch.tensor(V.IMAGENET_MEAN)) / torch.tensor(V.IMAGENET_STD)
    torch.testing.assert_close(seen["vit"].mean((0, 2, 3)), want, atol=5e-3, rtol=0)


# ----------------------------------------------------------------------------- CLIP ViT-L/14 (the original SPHINX's)

CLIP_TOY = V.ViTConfig(dim=32, depth=2, heads=4, patch=14, pos_grid=4, mlp_ratio=2.0, eps=1e-5, **V.CLIP_VIT)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    _perturb(ref, 3)
    path = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(path)
    return ref, path


def to_openai_clip(hf_path, out, prefix="clip.visual."):
    """transformers' CLIPVisionModel names -> OpenAI CLIP's (as the reference holds them: clip.visual.*)."""
    sd = {k.removeprefix("vision_model."): v for k, v in load_file(str(hf_path / "model.safetensors")).items()}
    o = {"conv1.weight": sd["embeddings.patch_embedding.weight"], "class_embedding": sd["embeddings.class_embedding"],
         "positional_embedding": sd["embeddings.position_embedding.weight"],
         "proj": torch.randn(32, 16)}                      # CLIP's joint-space projection: not read
    for p in ("weight", "bias"):
        o[f"ln_pre.{p}"], o[f"ln_post.{p}"] = sd[f"pre_layrnorm.{p}"], sd[f"post_layernorm.{p}"]
        for i in range(2):
            src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
            o[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{w}_proj.{p}"] for w in "qkv"])
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                o[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
    save_file({prefix + k: v.contiguous() for k, v in o.items()}, str(out))


def test_clip_vit_matches_hf_in_both_layouts(hf_clip, tmp_path):
    # Every token after ln_post, as the reference's clip_encode_image (transformers applies its
    # post_layernorm to the pooled cls only, so the oracle applies it here).
    ref, path = hf_clip
    ours = _load(V.ViT, CLIP_TOY, path)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = ref.post_layernorm(ref(x).last_hidden_state)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=0)
    to_openai_clip(path, tmp_path / "openai.safetensors")
    openai = _load(V.ViT, CLIP_TOY, tmp_path / "openai.safetensors")
    with torch.no_grad():
        assert torch.equal(openai(x), ours(x))


def test_clip_vitl14_parameter_count_equals_transformers():
    with torch.device("meta"):
        ours = V.ViT(V.VIT_CONFIGS["clip-vitl14"])
        ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
            patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 303_179_776


# ----------------------------------------------------------------------------- BLIP-2 Q-Former

QFORMER_TOY = V.QFormerConfig(
    vision=V.ViTConfig(dim=32, depth=2, heads=4, patch=14, pos_grid=4, ffn="mlp", mlp_hidden=48, layer_scale=False,
                       mask_token=False),
    dim=24, depth=3, heads=4, hidden=40, queries=5, cross_every=2)


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, qkv_bias=True),
        qformer_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                            cross_attention_frequency=2, encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                         num_attention_heads=2, word_embed_proj_dim=16),
        num_query_tokens=5)
    ref = transformers.Blip2Model(cfg).eval()
    _perturb(ref, 4)
    with torch.no_grad():                                # BLIP-2 never learnt a key bias (it has q and v only)
        for layer in ref.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[32:64] = 0
    path = tmp_path_factory.mktemp("blip2")
    ref.save_pretrained(path)
    return ref, path


def test_qformer_matches_blip2_get_qformer_features(hf_blip2, tmp_path):
    ref, path = hf_blip2
    with torch.device("meta"):
        ours = V.QFormer(QFORMER_TOY)
    ours = V.load_qformer(ours, path).eval()             # the whole Blip2Model: its language side is skipped
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = ref.get_qformer_features(pixel_values=x)
        want = getattr(want, "last_hidden_state", want)  # a tensor in transformers 5, an output object before
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=0)
    # As the reference holds it (qformer.*, the language model dropped), from an older transformers that
    # kept the vision attention's bias as q_bias / v_bias.
    sd = {}
    for k, v in load_file(str(path / "model.safetensors")).items():
        if k.startswith("language_"):
            continue
        if k.endswith("self_attn.qkv.bias"):
            q, _, v3 = v.chunk(3)
            sd["qformer." + k.replace("qkv.bias", "q_bias")], sd["qformer." + k.replace("qkv.bias", "v_bias")] = q, v3
        else:
            sd["qformer." + k] = v
    save_file(sd, str(tmp_path / "ref.safetensors"))
    with torch.device("meta"):
        old = V.QFormer(QFORMER_TOY)
    old = V.load_qformer(old, tmp_path / "ref.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(old(x), ours(x))


def test_blip2_opt27b_parameter_counts():
    # Salesforce/blip2-opt-2.7b's image side, counted against transformers' own classes on the meta device.
    with torch.device("meta"):
        ours = V.QFormer(V.QFormerConfig())
        cfg = transformers.Blip2Config(vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                                          num_attention_heads=16, image_size=224, patch_size=14,
                                                          qkv_bias=True),
                                       qformer_config=dict(), num_query_tokens=32)
        vision = transformers.Blip2VisionModel(cfg.vision_config)
        qformer = transformers.Blip2QFormerModel(cfg.qformer_config)
    want = sum(p.numel() for m in (vision, qformer) for p in m.parameters()) + 32 * 768
    assert sum(p.numel() for p in ours.parameters()) == want
