"""What each image token of a synthetic scene should say, and an LLM that learns to read it.

The tiny base's encoders are pretrained densely (tools/pretrain.py): for every grid cell of every view
they learn to name what covers the cell (colour, shape, which word) and where it is (its box in view
coordinates). This file holds that per-cell truth, and uses it a second time: written as a vector per
cell, laid out exactly as the image block (global view, then the sub-images; skip tokens where a view is
only padding), it is a *perfect reading* of the scene that the LLM can learn the tasks from before it
ever sees a pixel: `SceneTokens` plugs into `Sphinx` in place of the MoV. Afterwards `fit_projector`
maps the real encoders' tokens onto the same vectors (least squares), so the tuning starts from a
projector the LLM already understands. Nothing in the core imports this file.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model
import world
from tiling import ImageLayout, Tiles, photo_to_canvas

COLOURS = ("none",) + tuple(world.COLORS) + ("text",)
SHAPES = ("none",) + world.SHAPES + ("word",)
TEXTS = ("",) + world.WORDS
BOX_BINS = 10                   # the place code: each box coordinate as a bump over this many bins
PLACE_WIDTH = 4 * BOX_BINS
N_ATTRIBUTES = len(COLOURS) + len(SHAPES) + len(TEXTS) + 4 + PLACE_WIDTH   # one-hot colour, shape, word; the box; its place code
PLACE_CODE = slice(N_ATTRIBUTES - PLACE_WIDTH, N_ATTRIBUTES)
BOX = slice(PLACE_CODE.start - 4, PLACE_CODE.start)


# ----------------------------------------------------------------------------- the per-cell truth

def view_contents(sample: data.Sample, canvas: int, grid: int):
    """Per encoded view: [(colour or 'text', shape or 'word', box in view coordinates, the word or '')],
    things whose centre lies in the view. View 0 is the whole canvas, then the sub-images row-major
    (tiling.py)."""
    t = sample.truth
    things = [(o["color"], o["shape"], o["box"], "") for o in t["objects"]]
    if t["word"]:
        things.append(("text", "word", t["word"]["box"], t["word"]["text"]))
    out = []
    for v in range(1 + grid * grid):
        scale, (ox, oy) = (1, (0, 0)) if v == 0 else (grid, ((v - 1) % grid, (v - 1) // grid))
        inside = []
        for colour, shape, box, text in things:
            b = [c * scale - (ox if i % 2 == 0 else oy) for i, c in enumerate(photo_to_canvas(box, sample.image.size, canvas))]
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            if 0 <= cx < 1 and 0 <= cy < 1:
                inside.append((colour, shape, b, text))
        out.append(inside)
    return out


def cell_labels(contents, g: int):
    """Per grid cell of each view: colour id, shape id, word id and the box (view coordinates) of the thing
    covering the cell centre, or else of a thing whose centre lies in the cell (a thing smaller than a
    cell covers no cell centre); zeros where there is none."""
    col, shp, wrd, box = [], [], [], []
    centre_cell = lambda b: (int(g * (b[0] + b[2]) / 2), int(g * (b[1] + b[3]) / 2))
    for things in contents:
        for r in range(g):
            for c in range(g):
                x, y = (c + 0.5) / g, (r + 0.5) / g
                covers = [t for t in things if t[2][0] <= x < t[2][2] and t[2][1] <= y < t[2][3]]
                centred = [t for t in things if centre_cell(t[2]) == (c, r)]
                hit = (covers + centred + [None])[0]
                col.append(COLOURS.index(hit[0]) if hit else 0)
                shp.append(SHAPES.index(hit[1]) if hit else 0)
                wrd.append(TEXTS.index(hit[3]) if hit else 0)
                box.append(hit[2] if hit else [0.0] * 4)
    return torch.tensor(col), torch.tensor(shp), torch.tensor(wrd), torch.tensor(box)


def place_code(box: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes -> (..., 4 * BOX_BINS): each coordinate as a Gaussian bump one bin wide over BOX_BINS
    bins of [0, 1); zeros for the background's all-zero box. The tiny LLM turns a value into one of the
    answer's 100 number tokens far sooner when a small change of the value moves weight between
    neighbouring inputs than when it only scales one input: given only the box, it ignores the value and
    reads the place off which token it attends to (docs/results.md). Off unless pretrain.py's
    --place-steps is given."""
    centres = (torch.arange(BOX_BINS, dtype=box.dtype) + 0.5) / BOX_BINS
    code = torch.exp(-0.5 * ((box.unsqueeze(-1) - centres) * BOX_BINS) ** 2)
    return (code * box.ne(0).any(-1)[..., None, None]).flatten(-2)


def cell_attributes(contents, g: int) -> torch.Tensor:
    """(views, 1 + g*g tokens, N_ATTRIBUTES) from view_contents: per grid cell, the one-hot colour, shape
    and word of what covers it, its box in view coordinates and the box's place code ('none' and zeros
    for the background); each view's first token is the mean of its cells, as the ConvNeXt's is."""
    col, shp, wrd, box = cell_labels(contents, g)
    cells = torch.cat([F.one_hot(col, len(COLOURS)), F.one_hot(shp, len(SHAPES)), F.one_hot(wrd, len(TEXTS)),
                       box, place_code(box)], 1).float().view(len(contents), g * g, N_ATTRIBUTES)
    return with_mean_token(cells)


def with_mean_token(cells: torch.Tensor) -> torch.Tensor:
    """(views, cells, d) -> (views, 1 + cells, d): each view's first token the mean of its cells."""
    return torch.cat([cells.mean(1, keepdim=True), cells], 1)


def shift_boxes(views: torch.Tensor, dx: float) -> torch.Tensor:
    """(views, 1 + cells, N_ATTRIBUTES) with every thing's box moved by dx in x (view coordinates) and its
    place code with it, the background left at zero and each view's first token again the mean of its
    cells: what the place check (tools/pretrain.py) asks the LLM about."""
    cells = views[:, 1:].clone()
    box = cells[..., BOX] + cells[..., BOX].ne(0).any(-1, keepdim=True) * torch.tensor([dx, 0.0, dx, 0.0])
    cells[..., BOX], cells[..., PLACE_CODE] = box, place_code(box)
    return with_mean_token(cells)


def shuffle_cells(views: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(views, 1 + cells, d) -> each view's cells in a random order, its first (mean) token first. A token's
    position then says nothing of where its cell is: the place must be read from the value in it, which an
    LLM that learnt the tasks with the cells in order never does (docs/results.md)."""
    n, t = views.shape[:2]
    order = torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.rand(n, t - 1, generator=gen).argsort(1) + 1], 1)
    return torch.gather(views, 1, order[..., None].expand_as(views).to(views.device))


def scene_tiles(sample: data.Sample, tiles: Tiles, g: int) -> Tiles:
    """The sample's tiles with each view's pixels replaced by its cells' attributes (same skip pattern)."""
    return replace(tiles, views=cell_attributes(view_contents(sample, tiles.canvas, tiles.grid), g))


# ----------------------------------------------------------------------------- the LLM reads them

class SceneTokens(nn.Module):
    """The MoV's place in `Sphinx` (its image-path seam), fed the scene's cell attributes instead of
    pixels: Linear + LayerNorm into the LLM width, as the real projector is, on the same layout. With
    `place_code` False the place code's inputs are zeroed: the LLM first learns the tasks without it;
    with a generator in `shuffle` each view's cells come in a random order (the place phase)."""

    def __init__(self, llm_dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Sequential(nn.Linear(N_ATTRIBUTES, llm_dim), nn.LayerNorm(llm_dim))
        self.place_code = True
        self.shuffle: torch.Generator | None = None

    def layout(self, canvas: int, grid: int, skip_tokens: bool) -> ImageLayout:
        return ImageLayout(canvas, grid, 1 + (canvas // grid // self.patch) ** 2, skip_tokens)

    def freeze_encoders(self):
        """No encoders: the attributes are given."""

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        rest = torch.empty(self.proj[0].out_features, PLACE_CODE.start).normal_(std=std)
        self.proj[0].weight.zero_()                 # the place code joins at zero: switching it on changes nothing yet
        self.proj[0].weight[:, :PLACE_CODE.start] = rest
        nn.init.zeros_(self.proj[0].bias)
        self.proj[1].reset_parameters()

    def encode_images(self, images: list[Tiles], encoded: list[list[bool]], tp_group=None):
        views = [v for t, enc in zip(images, encoded) for v, e in zip(t.views, enc) if e]
        if not views:
            return None
        w, views = self.proj[0].weight, torch.stack(views)
        if not self.place_code:
            views = views.clone()
            views[..., PLACE_CODE] = 0
        if self.shuffle is not None:
            views = shuffle_cells(views, self.shuffle)
        return self.proj(views.to(w.device, w.dtype))


def encode_scene(sample: data.Sample, tok: data.Tokenizer, max_len: int, layout: ImageLayout, g: int) -> data.Encoded:
    """data.encode, with the image block made of the scene's attributes."""
    e = data.encode(sample, tok, max_len, layout)
    return e if e.tiles is None else replace(e, tiles=scene_tiles(sample, e.tiles, g))


def scene_grid(cfg) -> int:
    return cfg.view_size // cfg.vit.patch


def scene_model(cfg, llm: model.Transformer) -> model.Sphinx:
    """A Sphinx sharing `llm` whose image path is SceneTokens: the scene's cell attributes for pixels."""
    scene = model.build_sphinx(cfg, mov=lambda: SceneTokens(cfg.llm.dim, cfg.vit.patch))
    scene.llm = llm
    return scene


def scene_prompt(scene: model.Sphinx, tok: data.Tokenizer, g: int):
    """prompt_of for train.evaluate: the question in the chat template, the scene as its cells' attributes."""
    return lambda s: (data.prompt_tokens(tok, s.turns),
                      None if s.image is None else scene_tiles(s, scene.layout.tile(s.image), g))


# ----------------------------------------------------------------------------- the real projector

@torch.no_grad()
def fit_projector(mov, scene_proj: nn.Sequential, views: torch.Tensor, attributes: torch.Tensor,
                  lam: float = 1e-2) -> dict:
    """Set the real projector so that encoder tokens land where the scene's attributes would: the
    attributes are regressed on the frozen encoders' tokens (ridge, with a bias), and that linear map
    is composed with the scene projector's Linear; its LayerNorm is copied. Returns the fit's R^2 per
    attribute group on the fitting views."""
    x = mov.encode_frozen(views).flatten(0, 1).double()
    y = attributes.flatten(0, 1).double()
    x1 = F.pad(x, (0, 1), value=1.0)
    w = torch.linalg.solve(x1.T @ x1 + lam * len(x1) * torch.eye(x1.shape[1], dtype=x1.dtype), x1.T @ y)
    lin = scene_proj[0]
    weight, bias = lin.weight.double() @ w[:-1].T, lin.weight.double() @ w[-1] + lin.bias.double()
    mov.proj[0].weight.copy_(weight)
    mov.proj[0].bias.copy_(bias)
    mov.proj[1].load_state_dict(scene_proj[1].state_dict())
    pred, r2, at = x1 @ w, {}, 0
    groups = (("colour", len(COLOURS)), ("shape", len(SHAPES)), ("word", len(TEXTS)), ("box", 4), ("place code", PLACE_WIDTH))
    for name, n in groups:
        res, tot = pred[:, at:at + n] - y[:, at:at + n], y[:, at:at + n] - y[:, at:at + n].mean(0)
        r2[name] = 1 - (res ** 2).sum().item() / (tot ** 2).sum().item()
        at += n
    return r2
