"""HF transformers models with random weights, saved as users download them: the oracles of the tests."""
import torch
import transformers


def randomise_norms(hf_model, gen):
    # HF initialises RMSNorm weights to 1, which would hide a norm applied in the wrong place.
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


def perturb(model, seed):
    """HF inits LayerNorms to (1, 0) and layer scales to constants: perturb every weight so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_hf_llama(path, tie=False, theta=50000.0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, rope_theta=theta,
                                   max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-6, **kw)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    randomise_norms(ref, torch.Generator().manual_seed(seed + 1))
    ref.save_pretrained(path)
    return ref
