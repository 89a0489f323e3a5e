"""Generation as gpt-fast splits it: prefill the prompt (BOS, image block, text) in one pass into the
KV cache, then decode one token at a time, optionally through torch.compile; greedy or nucleus sampling.
Under tensor parallelism every rank runs the same loop and picks the same tokens."""
from __future__ import annotations

import torch

from model import Sphinx, Transformer
from parallel import gather_vocab
from tiling import Tiles


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
