"""moe.py: routing, the load-balancing loss, the layer against transformers' Mixtral block, TP, inference options."""

import pytest
import torch
import torch.nn.functional as F

import formats.hf as HF
import loading as L
from formats.encoders import load_encoder
import model as M
import moe
import moe_kernels

transformers = pytest.importorskip("transformers")


def test_every_path_runs_in_the_models_dtype_under_autocast():
    """Under bf16 autocast the router's Linear is autocast; the experts compute in the weights' fp32
    whatever the path (a padded bmm would otherwise be autocast to bf16 and break the scatter)."""
    torch.manual_seed(0)
    layer = moe.MoEFeedForward(32, 48, 4, 2)
    layer.init_weights(0.3)
    x = torch.randn(20, 32)
    outs = {}
    for path in ("reference", "grouped", "loop", "padded", "auto"):     # auto: the chooser times with autocast off
        layer.path, layer.w1.grad = path, None
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[path] = layer(xg)
        outs[path].sum().backward()
        assert outs[path].dtype == layer.w1.grad.dtype == xg.grad.dtype == torch.float32
        torch.testing.assert_close(outs[path], outs["reference"], atol=1e-5, rtol=0)


def test_routing_and_load_balancing_loss():
    torch.manual_seed(0)
    layer = moe.MoEFeedForward(16, 24, 6, 2)
    layer.init_weights(0.5)
    torch.nn.init.normal_(layer.gate.weight, std=0.5)
    x = torch.randn(50, 16)
    probs, top_w, top_idx = layer.route(x)
    ref = F.softmax(x.double() @ layer.gate.weight.double().T, -1)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=0)
    ref_w, ref_i = ref.topk(2, -1)
    assert torch.equal(top_idx, ref_i)
    torch.testing.assert_close(top_w.double(), ref_w / ref_w.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    # Switch loss: E / (N k) * sum_e count_e * mean_prob_e, in float64 by hand
    counts = torch.zeros(6, dtype=torch.float64)
    for i in ref_i.flatten().tolist():
        counts[i] += 1
    expected = 6 / (50 * 2) * (counts * ref.mean(0)).sum()
    torch.testing.assert_close(moe.load_balancing_loss(probs, top_idx, 6).double(), expected, atol=1e-6, rtol=0)
    uniform = torch.full((60, 6), 1 / 6)
    balanced = torch.arange(120).view(60, 2) % 6
    assert moe.load_balancing_loss(uniform, balanced, 6).item() == pytest.approx(1.0)


def test_dropless_every_token_gets_its_k_experts():
    torch.manual_seed(1)
    layer = moe.MoEFeedForward(12, 20, 4, 2)
    layer.init_weights(0.3)
    torch.nn.init.normal_(layer.gate.weight, std=2.0)   # skewed routing: one expert gets most tokens
    x = torch.randn(3, 40, 12)
    y = layer(x).view(-1, 12)
    _, w, idx = layer.route(x.view(-1, 12))
    for t in range(120):
        expected = sum(w[t, j] * (F.silu(x.view(-1, 12)[t] @ layer.w1[e].T) * (x.view(-1, 12)[t] @ layer.w3[e].T)) @ layer.w2[e].T
                       for j, e in enumerate(idx[t].tolist()))
        torch.testing.assert_close(y[t], expected, atol=1e-5, rtol=0)


def _hf_block_and_ours(E=4, k=2, d=32, hidden=48, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=E, num_experts_per_tok=k)
    ref = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.3)
    ours = moe.MoEFeedForward(d, hidden, E, k)
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.w1.copy_(ref.experts.gate_up_proj[:, :hidden])
        ours.w3.copy_(ref.experts.gate_up_proj[:, hidden:])
        ours.w2.copy_(ref.experts.down_proj)
    return ref, ours


@pytest.mark.parametrize("path", ["auto", "grouped", "loop", "padded", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not moe_kernels.HAS_TRITON, reason="triton is not installed (no wheels on this platform)"))])
def test_layer_matches_transformers_block(path):
    ref, ours = _hf_block_and_ours()
    ours.path = path
    x = torch.randn(2, 9, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), ours(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=0)
    hidden = ours.w1.shape[1]
    torch.testing.assert_close(ours.w1.grad, ref.experts.gate_up_proj.grad[:, :hidden], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.w2.grad, ref.experts.down_proj.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.gate.weight.grad, ref.gate.weight.grad, atol=1e-5, rtol=1e-5)   # |grad| ~ 10


def test_tensor_parallel_shards_sum_to_the_full_layer():
    _, full = _hf_block_and_ours(seed=3)
    x = torch.randn(30, 32)
    parts = []
    for r in range(2):   # shard every expert along its hidden dim: w1/w3 rows, w2 columns; gate replicated
        shard = moe.MoEFeedForward(32, 24, 4, 2)
        with torch.no_grad():
            shard.gate.weight.copy_(full.gate.weight)
            shard.w1.copy_(full.w1[:, r * 24:(r + 1) * 24])
            shard.w3.copy_(full.w3[:, r * 24:(r + 1) * 24])
            shard.w2.copy_(full.w2[:, :, r * 24:(r + 1) * 24])
        parts.append(shard(x))
    torch.testing.assert_close(parts[0] + parts[1], full(x), atol=1e-5, rtol=0)   # the caller's all-reduce


def make_hf_mixtral(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=128,
                                     tie_word_embeddings=False, rms_norm_eps=1e-5)
    ref = transformers.MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif "gate.weight" in name:
                p.normal_(std=0.5, generator=g)       # decisive routing, so a routing bug shows
    ref.save_pretrained(path)
    return ref


@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    return make_hf_mixtral(path), path


def test_mixtral_logits_match_transformers(hf_mixtral):
    ref, path = hf_mixtral
    ours = HF.load_hf(path).eval()
    assert ours.cfg.n_experts == 4 and ours.cfg.top_k == 2 and ours.cfg.rope_theta == 1e6
    tokens = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], ref(tokens).logits, atol=1e-4, rtol=0)


def test_mixtral_missing_expert_is_named(hf_mixtral, tmp_path):
    from safetensors.torch import load_file, save_file
    ref, path = hf_mixtral
    sd = load_file(str(path / "model.safetensors"))
    sd.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(L.CheckpointError, match=r"layers\.1\.feed_forward\.w3: experts \[2\] missing"):
        HF.load_hf(tmp_path)


def test_inference_options_top_k_prune_usage(hf_mixtral):
    _, path = hf_mixtral
    model = HF.load_hf(path).eval()
    tokens = torch.randint(0, 300, (2, 15))
    layer = moe.moe_layers(model)[0]
    x = torch.randn(20, 64)
    # k = E: every expert, weighted by the full softmax
    moe.set_top_k(model, 4)
    probs = F.softmax(layer.gate(x).float(), -1)
    dense = sum(probs[:, e:e + 1] * (F.silu(x @ layer.w1[e].T) * (x @ layer.w3[e].T)) @ layer.w2[e].T for e in range(4))
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="top_k 5 must be in 1..4"):
        moe.set_top_k(model, 5)
    # pruning to experts {1, 3} with k=2: both kept experts, renormalised over the two
    moe.set_top_k(model, 2)
    layer.prune([1, 3])
    p = probs[:, [1, 3]] / probs[:, [1, 3]].sum(-1, keepdim=True)
    kept = sum(p[:, j:j + 1] * (F.silu(x @ layer.w1[e].T) * (x @ layer.w3[e].T)) @ layer.w2[e].T for j, e in enumerate((1, 3)))
    torch.testing.assert_close(layer(x), kept, atol=1e-5, rtol=0)
    layer.kept_experts = None
    # usage counts: N * k assignments per layer
    moe.track_usage(model)
    with torch.no_grad():
        model(tokens)
    report = moe.usage_report(model)
    assert [int(m.usage.sum()) for m in moe.moe_layers(model)] == [2 * 15 * 2] * 2
    assert report.count("layer") == 2 and "e0=" in report
    moe.track_usage(model, False)


def test_tiny_moe_size_and_aux_loss():
    torch.manual_seed(0)
    model = M.build(M.llm_config("tiny-moe", n_layers=2))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    _, loss = model(tokens, targets=tokens)
    aux = moe.total_aux_loss(model)
    assert aux is not None and 0.5 < aux.item() < 4.0
    (loss + 0.01 * aux).backward()
    assert model.layers[0].feed_forward.gate.weight.grad.abs().sum() > 0
