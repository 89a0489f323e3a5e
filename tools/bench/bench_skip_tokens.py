"""MoV + LLM prefill for a 2:1 photo, with and without skip tokens, in one run.

    python tools/bench/bench_skip_tokens.py

Paper geometry (canvas 448, 2x2 sub-images of 224, 257 tokens per view: ViT patch 14,
ConvNeXt fed 512 px) with CPU-sized encoders (ConvNeXt-T-like, ViT-S/14-like) and a
d=1024, 8-layer LLM; fp32.
"""
from dataclasses import replace

from common import keep_freed_memory, machine, table, timeit

import numpy as np
import torch
from PIL import Image

import model as M
import tiling as T
from vision import ConvNeXtConfig, ViTConfig

keep_freed_memory()
torch.manual_seed(0)
llm = M.ModelConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=16, vocab_size=32000, ffn_dim=2816, max_seq_len=2048)
cfg = M.SphinxConfig(llm=llm, convnext=ConvNeXtConfig(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), input_size=512),
                     vit=ViTConfig(dim=384, depth=12, heads=6, patch=14, pos_grid=16, ffn="mlp"), canvas=448, grid=2)
on = M.build_sphinx(cfg).eval()
off = M.build_sphinx(replace(cfg, skip_tokens=False), init=False)
off.load_state_dict(on.state_dict(), assign=True)           # the very same weights
off.eval()

photo = Image.fromarray((np.random.default_rng(0).random((300, 600, 3)) * 255).astype(np.uint8))   # 2:1
tiles = T.tile(photo, cfg.canvas, cfg.grid)
tokens = torch.randint(2, 32000, (1, 40))
tokens[0, 0] = 1


def prefill(model):
    with torch.no_grad():
        return model(tokens, [tiles], last_only=True)


rows, times = [], {}
for name, model in (("skip tokens off (every view encoded)", off), ("skip tokens on", on)):
    cost = model.image_cost(tiles)
    t = timeit(lambda: prefill(model), warmup=1, repeat=5)
    times[name] = t
    rows.append([name, cost["views_encoded"], cost["skip_tokens"], cost["image_tokens"], f"{t * 1e3:.0f}"])
t_off = times["skip tokens off (every view encoded)"]
for r in rows:
    r.append(f"{times[r[0]] / t_off:.2f}x")
print(f"2:1 photo {photo.size}, canvas 448, 2x2 sub-images; {machine()}")
print(table(rows, ["", "views encoded", "skip tokens", "image tokens", "MoV + prefill ms", "time vs off"]))
