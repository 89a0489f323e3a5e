"""formats/released_vision.py: the released models' views of the centred canvas, and the original SPHINX's
CLIP ViT-L and BLIP-2 Q-Former against HF transformers (random weights)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from PIL import Image

import formats.released_vision as RV
import vision as V
from formats.encoders import load_encoder

transformers = pytest.importorskip("transformers")
from hf_oracles import perturb  # noqa: E402  (needs transformers)


_perturb = perturb


def test_reference_tile_centres_the_photo_on_a_clip_mean_square():
    # LLaMA2-Accessory's padded_resize: a 200 x 100 photo goes into a 200 x 200 square 50 px from the top,
    # the rest is the CLIP mean (122, 116, 104); then a bicubic resize to the canvas.
    photo = Image.new("RGB", (200, 100), (250, 10, 10))
    t = RV.reference_tile(photo, canvas=64)
    assert t.views.shape == (1, 3, 64, 64) and t.fully_padded == [False] * 5
    x = t.views[0] * 255
    fill = torch.tensor(RV.REFERENCE_FILL, dtype=torch.float32).view(3, 1)
    torch.testing.assert_close(x[:, :14].reshape(3, -1).mean(1, keepdim=True), fill, atol=0.5, rtol=0)   # above
    torch.testing.assert_close(x[:, 51:].reshape(3, -1).mean(1, keepdim=True), fill, atol=0.5, rtol=0)   # below
    torch.testing.assert_close(x[:, 18:46].reshape(3, -1).mean(1), torch.tensor([250.0, 10.0, 10.0]), atol=0.5, rtol=0)
    layout = RV.ReleasedLayout(64, 2, 17, skip_tokens=False)
    assert layout.tile(photo).views.shape == (1, 3, 64, 64) and layout.block_len_for_size(200, 100) == 5 * 19


def _load(module_cls, cfg, path):
    with torch.device("meta"):
        m = module_cls(cfg)
    return load_encoder(m, path).eval()


def test_reference_views_and_renormalisation():
    # llama_ens5_light's encode_image: ConvNeXt gets the canvas resized then its four quadrants unchanged;
    # DINOv2 gets CLIP-normalised pixels re-expressed in ImageNet statistics.
    torch.manual_seed(0)
    mov = RV.ReleasedMoV(V.ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), input_size=None),
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

CLIP_TOY = V.ViTConfig(dim=32, depth=2, heads=4, patch=14, pos_grid=4, mlp_ratio=2.0, eps=1e-5, **RV.CLIP_VIT)


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
        ours = V.ViT(RV.CLIP_VITL14)
        ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
            patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 303_179_776


# ----------------------------------------------------------------------------- BLIP-2 Q-Former

QFORMER_TOY = RV.QFormerConfig(
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
        ours = RV.QFormer(QFORMER_TOY)
    ours = RV.load_qformer(ours, path).eval()             # the whole Blip2Model: its language side is skipped
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
        old = RV.QFormer(QFORMER_TOY)
    old = RV.load_qformer(old, tmp_path / "ref.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(old(x), ours(x))


def test_blip2_opt27b_parameter_counts():
    # Salesforce/blip2-opt-2.7b's image side, counted against transformers' own classes on the meta device.
    with torch.device("meta"):
        ours = RV.QFormer(RV.QFormerConfig())
        cfg = transformers.Blip2Config(vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                                          num_attention_heads=16, image_size=224, patch_size=14,
                                                          qkv_bias=True),
                                       qformer_config=dict(), num_query_tokens=32)
        vision = transformers.Blip2VisionModel(cfg.vision_config)
        qformer = transformers.Blip2QFormerModel(cfg.qformer_config)
    want = sum(p.numel() for m in (vision, qformer) for p in m.parameters()) + 32 * 768
    assert sum(p.numel() for p in ours.parameters()) == want
