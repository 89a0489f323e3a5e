"""moe.py: routing, every expert path (Triton under the interpreter, the CPU paths) against a float64 loop,
the path chooser, Mixtral parity."""

import pytest
import torch
import torch.nn.functional as F

import loading as L
import model as M
import moe

transformers = pytest.importorskip("transformers")


def _reference(x, w1, w3, w2, offsets, grad):
    """Float64 per-expert loop: forward and all four gradients."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w3, w2)]
    y = moe.swiglu_reference(*leaves, offsets)
    y.backward(grad.double())
    return y.detach(), [t.grad for t in leaves]


KERNEL_CASES = [  # (experts, tokens per expert, d, hidden): zero-token experts, one token, odd dims
    (5, [0, 1, 70, 0, 33], 40, 72),
    (3, [65, 64, 1], 33, 100),
    (8, "random", 64, 96),
]


PATH_DTYPES = [("triton", torch.float32), ("triton", torch.float16)] + [
    (p, dt) for p in ("grouped", "loop", "padded") for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("path,dtype", PATH_DTYPES)
@pytest.mark.parametrize("E,counts,d,hidden", KERNEL_CASES)
def test_every_path_matches_float64_loop(path, dtype, E, counts, d, hidden):
    g = torch.Generator().manual_seed(E * 100 + d)
    if counts == "random":
        counts = torch.randint(0, 40, (E,), generator=g)
        counts[torch.randint(0, E, (2,), generator=g)] = 0
    counts = torch.as_tensor(counts)
    offsets = counts.cumsum(0)
    M_ = int(offsets[-1])
    x = torch.randn(M_, d, generator=g).to(dtype).requires_grad_()
    ws = [(0.2 * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()
          for shape in ((E, hidden, d), (E, hidden, d), (E, d, hidden))]
    grad = torch.randn(M_, d, generator=g).to(dtype)
    if path == "grouped" and (d * x.element_size()) % 16:
        with pytest.raises(RuntimeError, match="16 bytes"):    # _grouped_mm's rule; the chooser skips it
            moe.swiglu_experts(x, *ws, offsets, path)
        return
    y = moe.swiglu_experts(x, *ws, offsets, path)
    y.backward(grad)
    y_ref, grads_ref = _reference(x, *ws, offsets, grad)
    # fp32: tight. fp16/bf16: inputs and stored intermediates are rounded (8 / 11 significant bits).
    rel = {torch.float32: 2e-6, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    for name, got, ref in [("y", y, y_ref), *zip(("dx", "dw1", "dw3", "dw2"), (x.grad, *(w.grad for w in ws)), grads_ref)]:
        assert got.dtype == dtype
        err = (got.double() - ref).abs().max().item()
        assert err <= rel * max(ref.abs().max().item(), 1.0), (name, err)
    # experts with no tokens get exactly zero weight gradients
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert all(w.grad[e].abs().max() == 0 for w in ws)


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


def test_chooser_takes_the_fastest_per_bucket_and_remembers(monkeypatch):
    E, d, hidden = 4, 36, 20        # d * 4 bytes = 144: aligned; hidden 20 * 4 = 80 also
    torch.manual_seed(0)
    ws = [torch.randn(*s, requires_grad=True) for s in ((E, hidden, d), (E, hidden, d), (E, d, hidden))]
    offsets = torch.tensor([3, 3, 9, 12])
    x = torch.randn(12, d)
    fake = {"grouped": 3.0, "loop": 1.0, "padded": 2.0}        # seconds each path "takes"
    timed = []

    def time_paths(self, grads, *args):
        timed.append(grads)
        return dict(fake)
    monkeypatch.setattr(moe.ExpertPathChooser, "time_paths", time_paths)
    chooser = moe.ExpertPathChooser()
    assert chooser(x, *ws, offsets, True) == "loop"
    assert chooser(x[:9], *ws, torch.tensor([3, 3, 9, 9]), True) == "loop" and len(timed) == 1   # 9 and 12 rows: bucket 16
    fake["loop"] = 9.0
    assert chooser(x, *ws, offsets, False) == "padded"     # no gradients: its own bucket, timed anew
    assert timed == [True, False]
    assert chooser(x[:3], *ws, torch.tensor([3, 3, 3, 3]), True) == "padded" and len(timed) == 3   # 3 rows: bucket 4


def test_chooser_times_real_paths_without_side_effects():
    E, d, hidden = 4, 33, 20        # d = 33: _grouped_mm cannot run, so it must come out inf
    torch.manual_seed(0)
    ws = [torch.randn(*s, requires_grad=True) for s in ((E, hidden, d), (E, hidden, d), (E, d, hidden))]
    x, offsets = torch.randn(10, d), torch.tensor([2, 5, 5, 10])
    rng = torch.get_rng_state()
    chooser = moe.ExpertPathChooser()
    best = chooser(x, *ws, offsets, True)
    (timings,) = chooser.timings.values()
    assert timings["grouped"] == float("inf") and best in ("loop", "padded")
    assert 0 < timings[best] == min(timings.values()) < 1
    assert torch.equal(torch.get_rng_state(), rng) and all(w.grad is None for w in ws)


def test_tile_table_skips_empty_experts():
    offsets = torch.tensor([0, 130, 130, 131])         # experts 0 and 2 are empty
    expert, row = moe._tile_table(offsets, 131, 64)
    valid = expert >= 0
    assert expert[valid].tolist() == [1, 1, 1, 3] and row[valid].tolist() == [0, 64, 128, 130]
    assert len(expert) == 3 + 4                        # upper bound cdiv(M, BM) + E; the rest are spare


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


@pytest.mark.parametrize("path", ["auto", "grouped", "loop", "padded", "triton", "reference"])
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
    ours = L.load_hf(path).eval()
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
        L.load_hf(tmp_path)


def test_inference_options_top_k_prune_usage(hf_mixtral):
    _, path = hf_mixtral
    model = L.load_hf(path).eval()
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
