"""Generation as gpt-fast splits it: prefill the prompt (BOS, image block, text) in one pass into the
KV cache, then decode one token at a time, optionally through torch.compile; greedy or nucleus sampling.
Under tensor parallelism every rank runs the same loop and picks the same tokens."""
from __future__ import annotations

import torch

from model import Sphinx, Transformer, best_seconds
from parallel import gather_vocab
from tiling import Tiles


def decode_matvec_flops(cfg, dtype, head_rows: int = 8192) -> float:
    """FLOP/s here of what decoding one token is made of: matrix-vector products at the model's own shapes
    (an FFN's three and the output head, capped at head_rows rows), best of 3. sample.py picks its
    precision by this, not by big matmuls: at d=256 a bf16 matvec is ~2x slower than fp32 even on an
    AVX-512-BF16 CPU, at d=1024 with a 32k vocabulary ~1.8x faster."""
    shapes = [(cfg.ffn_dim, cfg.dim), (cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim), (min(cfg.vocab_size, head_rows), cfg.dim)]
    ws = [torch.empty(r, c, dtype=dtype).uniform_(-0.1, 0.1) for r, c in shapes]
    xs = [torch.ones(1, c, dtype=dtype) for _, c in shapes]
    def ten_tokens():
        for _ in range(10):
            for x, w in zip(xs, ws):
                torch.nn.functional.linear(x, w)
    return 10 * sum(2 * r * c for r, c in shapes) / best_seconds(ten_tokens)


def prefill(llm: Transformer, embeds) -> torch.Tensor:
    """The whole prompt in one pass, filling the KV cache; the next token's full-vocab logits."""
    logits, _ = llm(embeds=embeds, last_only=True)
    return gather_vocab(logits[0, -1].float(), llm.tp_group)


def decode_tokens(llm: Transformer, logits, pos: int, max_new_tokens: int, step, pick, stop_ids=(),
                  stop_text=None, decode_text=None):
    """One token at a time from the KV cache: pick(logits) -> the next id, step(token, pos) -> its logits.
    Stops on a stop id, after max_new_tokens, or when the decoded text ends with stop_text."""
    device, out = llm.norm.weight.device, []
    for _ in range(max_new_tokens):
        nxt = pick(logits)
        if nxt in stop_ids:
            return
        out.append(nxt)
        yield nxt
        if len(out) == max_new_tokens or (stop_text and decode_text and decode_text(out).endswith(stop_text)):
            return
        logits = gather_vocab(step(torch.tensor([[nxt]], device=device), pos)[0, -1].float(), llm.tp_group)
        pos += 1


@torch.inference_mode()
def generate(model, tokens: list[int], tiles: Tiles | None, max_new_tokens: int, stop_ids=(),
             stop_text=None, decode=None, temperature: float = 0.0, top_p: float = 1.0, generator=None,
             compile: bool = False):
    """Prefill [BOS][image block][prompt] once, then decode with the KV cache (gpt-fast's split).
    Yields token ids as they are produced. Stops on a stop id, or when the decoded text ends with
    stop_text (the template's "\n###"; decode: ids -> text). Under TP every rank runs this and gets the
    same tokens. compile: run the one-token step through torch.compile (see `compiled_step`)."""
    llm = model.llm if isinstance(model, Sphinx) else model          # a bare Transformer works too
    x = torch.tensor([tokens], device=llm.norm.weight.device)
    if isinstance(model, Sphinx):
        embeds, _ = model.embed(x, [tiles] if tiles is not None else None)
    else:
        embeds = llm.embed_tokens(x)
    total = embeds.shape[1] + max_new_tokens
    if total > llm.cfg.max_seq_len:
        raise ValueError(f"prompt of {embeds.shape[1]} positions + {max_new_tokens} new tokens exceeds "
                         f"max_seq_len {llm.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    # The cache is sized in buckets of 256 positions so that a compiled step sees few distinct shapes.
    llm.setup_cache(1, min(llm.cfg.max_seq_len, -(-total // 256) * 256))
    try:
        yield from decode_tokens(llm, prefill(llm, embeds), embeds.shape[1], max_new_tokens,
                          compiled_step(llm) if compile else llm.decode_step,
                          lambda logits: sample_token(logits, temperature, top_p, generator),
                          stop_ids, stop_text, decode)
    finally:
        llm.clear_cache()
        model.train(was_training)


def compiled_step(llm: Transformer):
    """The one-token decode step under torch.compile (as gpt-fast): at batch 1 the eager step is
    ~100 small ops whose dispatch costs more than the arithmetic; compiled, they fuse into a few
    kernels. Compiled once per model (tens of seconds on a CPU, cached on disk by inductor), so it
    pays off for long answers and chats."""
    if llm.tp_group is not None:
        raise ValueError("compile=True is for single-process generation (the step would trace TP collectives)")
    if getattr(llm, "_compiled_step", None) is None:
        llm._compiled_step = torch.compile(llm.decode_step, dynamic=True)
    return llm._compiled_step


def sample_token(logits, temperature: float, top_p: float, generator=None) -> int:
    """Greedy at temperature 0; else nucleus sampling (the reference demo: T=0.1, top-p 0.75)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1)
    sorted_p, idx = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p           # the smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    return int(idx[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
