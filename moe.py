"""Mixtral sparse Mixture-of-Experts FFN, as SPHINX-MoE uses it (paper Sec. 3.4).

Router (replicated Linear(d, E)) -> softmax over all experts in fp32 -> top-k ->
renormalise the k weights -> tokens grouped by expert (sort, counts, offsets) ->
SwiGLU experts as grouped GEMMs (moe_kernels.py) -> weighted scatter back. Dropless: no
capacity, every token reaches its k experts. The Switch-style load-balancing loss is kept on
the module after each training forward.

The experts' weights are stacked per layer, w1/w3: (E, hidden, d), w2: (E, d, hidden),
so one grouped GEMM covers every expert. Under tensor parallelism each expert is
sharded along `hidden` (w1/w3 rows, w2 columns): the layer then returns a partial sum
that the caller all-reduces, exactly like the dense FFN.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_kernels import ExpertPathChooser, swiglu_experts


def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer loss E / (N k) * dot(tokens_per_expert, mean_probs); 1.0 when balanced.

    probs: (N, E) router softmax; top_idx: (N, k) chosen experts.
    """
    N, k = top_idx.shape
    tokens_per_expert = torch.bincount(top_idx.flatten(), minlength=n_experts).to(probs.dtype)
    return n_experts / (N * k) * torch.dot(tokens_per_expert, probs.mean(0))


def group_by_expert(top_idx: torch.Tensor, n_experts: int):
    """Sort the N*k (token, expert) assignments by expert.

    Returns order (positions into the flattened (N, k) assignments, grouped by expert),
    counts per expert and the end offset of each expert's rows.
    """
    flat = top_idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts, counts.cumsum(0)


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, chooser: ExpertPathChooser | None = None):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)          # the router, replicated under TP
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.kept_experts: torch.Tensor | None = None               # pruning mask (E,) bool
        self.aux_loss: torch.Tensor | None = None                   # load-balancing loss of the last training forward
        self.usage: torch.Tensor | None = None                      # per-expert token counts when tracking
        self.path = "auto"                  # or one of PATHS / "reference"; auto: Triton on GPU, else timed
        self.chooser = chooser or ExpertPathChooser()               # shared by a model's MoE layers

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=std)

    def prune(self, keep):
        """Route only to the experts in `keep`; the softmax renormalises over them (paper A.1)."""
        keep = sorted(set(int(e) for e in keep))
        if not keep or keep[0] < 0 or keep[-1] >= self.n_experts or len(keep) < self.top_k:
            raise ValueError(f"keep {keep}: need at least top_k={self.top_k} experts in 0..{self.n_experts - 1}")
        mask = torch.zeros(self.n_experts, dtype=torch.bool, device=self.gate.weight.device)
        mask[keep] = True
        self.kept_experts = mask

    def route(self, x):
        logits = self.gate(x).float()
        if self.kept_experts is not None:
            logits = logits.masked_fill(~self.kept_experts, float("-inf"))
        probs = logits.softmax(-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)
        return probs, top_w / top_w.sum(-1, keepdim=True), top_idx

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, top_w, top_idx = self.route(x)
        if self.training:
            self.aux_loss = load_balancing_loss(probs, top_idx, self.n_experts)
        order, counts, offsets = group_by_expert(top_idx, self.n_experts)
        if self.usage is not None:
            self.usage += counts.to(self.usage.device)
        token = order // self.top_k
        rows = x.index_select(0, token)                         # backward: index_add_, ~5x faster than x[token]'s
        y = swiglu_experts(rows, self.w1, self.w3, self.w2, offsets, self.path, self.chooser)
        y = y * top_w.flatten().index_select(0, order)[:, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y).view(shape)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_top_k(model: nn.Module, k: int):
    """Change the number of active experts at load or sample time (paper A.1: k=2 best, k=4 on MME)."""
    for m in moe_layers(model):
        if not 1 <= k <= m.n_experts:
            raise ValueError(f"top_k {k} must be in 1..{m.n_experts}")
        m.top_k = k


def prune_experts(model: nn.Module, keep):
    """Keep only the experts in `keep` in every MoE layer (paper App. A.1.3: pruned experts at inference)."""
    for m in moe_layers(model):
        m.prune(keep)


def track_usage(model: nn.Module, on: bool = True):
    for m in moe_layers(model):
        m.usage = torch.zeros(m.n_experts, dtype=torch.long) if on else None


def usage_report(model: nn.Module) -> str:
    """One line per MoE layer: share of routed tokens per expert."""
    lines = []
    for i, m in enumerate(moe_layers(model)):
        if m.usage is None:
            continue
        share = m.usage.float() / max(int(m.usage.sum()), 1)
        lines.append(f"layer {i:2d}: " + " ".join(f"e{e}={s:5.1%}" for e, s in enumerate(share.tolist())))
    return "\n".join(lines)


def total_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Load-balancing loss averaged over the MoE layers (the reference weights it by 0.01)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None
