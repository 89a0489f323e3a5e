"""parallel.py's rules, directly: which tensors TP splits and how, and the vocab-parallel pieces on a
2-process gloo group against their single-process equivalents."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallel as P
from multiproc import free_port, spawn


def test_split_rules_follow_megatron():
    # Column-parallel (output rows split): q, k, v, the dense FFN's w1/w3, the vocab of embedding and head;
    # row-parallel (input columns split): wo and w2; stacked experts split their hidden dim; the rest replicated.
    cases = {"llm.layers.0.attention.wq.weight": 0, "llm.layers.3.attention.wk.weight": 0,
             "llm.layers.0.attention.wv.weight": 0, "llm.layers.0.attention.wo.weight": 1,
             "llm.layers.0.feed_forward.w1.weight": 0, "llm.layers.0.feed_forward.w3.weight": 0,
             "llm.layers.0.feed_forward.w2.weight": 1, "llm.layers.0.feed_forward.w1": 1,
             "llm.layers.0.feed_forward.w3": 1, "llm.layers.0.feed_forward.w2": 2,
             "llm.tok_embeddings.weight": 0, "llm.output.weight": 0,
             "llm.layers.0.feed_forward.gate.weight": None, "llm.layers.0.attention_norm.weight": None,
             "llm.norm.weight": None, "mov.proj.0.weight": None, "skip_token": None, "mov.vit.blocks.0.qkv.weight": None}
    assert {n: P.split_dim(n) for n in cases} == cases


def test_shard_is_an_exact_partition_and_refuses_uneven_splits():
    full = torch.randn(6, 4)
    parts = [P.shard("x.attention.wq.weight", full, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts, 0), full) and parts[1].is_contiguous()
    assert P.shard("x.norm.weight", full, 1, 3) is full
    with pytest.raises(ValueError, match="does not split over 4 TP ranks"):
        P.shard("x.attention.wq.weight", full, 0, 4)


def _vocab_worker(rank, port, seed, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(seed)
    V, d = 10, 6
    weight, tokens = torch.randn(V, d), torch.randint(0, V, (3, 5))
    logits, targets = torch.randn(15, V, requires_grad=True), torch.randint(0, V, (15,))
    targets[:4] = -100
    group = dist.group.WORLD
    lo, hi = rank * V // 2, (rank + 1) * V // 2
    emb = P.vocab_parallel_embedding(tokens, weight[lo:hi], group)
    local = logits.detach()[:, lo:hi].clone().requires_grad_()
    loss = P.cross_entropy_sum(local, targets, -100, group)
    loss.backward()
    gathered = P.gather_vocab(logits.detach()[:, lo:hi], group)
    torch.save({"emb": emb, "loss": loss.detach(), "grad": local.grad, "gathered": gathered}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_vocab_parallel_embedding_loss_and_gather_match_one_process(tmp_path):
    out = str(tmp_path / "r")
    spawn(_vocab_worker, (free_port(), 0, out), 2, timeout=120)
    torch.manual_seed(0)
    V = 10
    weight, tokens = torch.randn(V, 6), torch.randint(0, V, (3, 5))
    logits, targets = torch.randn(15, V, requires_grad=True), torch.randint(0, V, (15,))
    targets[:4] = -100
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    loss.backward()
    for r in range(2):
        got = torch.load(f"{out}.{r}")
        torch.testing.assert_close(got["emb"], F.embedding(tokens, weight), rtol=0, atol=0)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["grad"], logits.grad[:, r * 5:(r + 1) * 5], rtol=1e-6, atol=1e-6)
        assert torch.equal(got["gathered"], logits.detach())


def _split_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4)                       # 5 views over 2 ranks: 3 + 2 (and one padding row)
    seen = []

    def fn(rows):                                  # two output rows per input row, like 5 views per canvas
        seen.append(rows.shape[0])
        return torch.cat([rows.sin(), rows.cos()], dim=1).repeat_interleave(2, dim=0)
    got = P.split_rows_and_gather(fn, x, dist.group.WORLD)
    torch.save({"got": got, "seen": seen}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_split_rows_and_gather_encodes_a_share_per_rank_and_equals_one_process(tmp_path):
    out = str(tmp_path / "s")
    spawn(_split_worker, (free_port(), out), 2, timeout=120)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4)
    want = torch.cat([x.sin(), x.cos()], dim=1).repeat_interleave(2, dim=0)
    for r in range(2):
        res = torch.load(f"{out}.{r}")
        assert res["seen"] == [3]                  # each rank encodes ceil(5 / 2) views, not all 5
        assert torch.equal(res["got"], want)


def _gather_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mine = [{"rank": rank, "i": i} for i in range(3 + rank)]          # unequal lengths: 3 and 4
    torch.save(P.gather_lists(mine, dist.group.WORLD), f"{out}.{rank}")
    dist.destroy_process_group()


def test_gather_lists_gives_every_rank_all_items_in_rank_order(tmp_path):
    out = str(tmp_path / "g")
    spawn(_gather_worker, (free_port(), out), 2, timeout=120)
    want = [{"rank": r, "i": i} for r in range(2) for i in range(3 + r)]
    for r in range(2):
        assert torch.load(f"{out}.{r}") == want
    assert P.gather_lists([1, 2], None) == [1, 2]                       # one rank: no collective
