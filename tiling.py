"""High-resolution tiling (paper Sec. 3.1): one global view + sub-images, and skip tokens.

The photo keeps its aspect ratio, is resized to fit a square canvas (448 for 2x2
sub-images of 224, 672 for 3x3) and placed at the TOP-LEFT; the rest is padding.
Views: the whole canvas downsampled to one sub-image size (global view), then the
sub-images in row-major order. A sub-image that holds no photo pixel is *fully padded*;
it is decided from the geometry alone (never from pixel values: a black photo region is
not padding), and the model puts one learnable skip token in its place.

Boxes are text, [x1, y1, x2, y2] normalised to 0-1 on the padded canvas with 2 decimals (the
reference's convention); helpers convert between photo pixels and canvas coordinates.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_PIXELS = 89_478_485        # PIL's own decompression-bomb limit; larger images are refused


class ImageError(ValueError):
    """An image that cannot be used: names the file and the reason."""


@dataclass
class Tiles:
    # (1 + grid^2, 3, S, S) in [0, 1]: global view, then sub-images row-major. (An image path from
    # outside, such as the released checkpoints', may hold (1, 3, C, C): the canvas its encoders cut.)
    views: torch.Tensor
    fully_padded: list[bool]     # per view; the global view is never padded
    grid: int
    canvas: int
    resized: tuple[int, int]     # (w, h) of the photo on the canvas

    @property
    def n_fully_padded(self) -> int:
        return sum(self.fully_padded)


@dataclass(frozen=True)
class ImageLayout:
    """How many LLM positions an image takes: per view <img> tokens </img>, or one skip token."""
    canvas: int
    grid: int
    tokens_per_view: int
    skip_tokens: bool = True

    def tile(self, img: Image.Image) -> "Tiles":
        return tile(img, self.canvas, self.grid)

    def encoded(self, fully_padded: list[bool]) -> list[bool]:
        """The skip-token rule (paper Sec. 3.1), stated once: per view, True if it goes through the
        encoders, False if a fully padded sub-image is replaced by one learnable skip token."""
        return [not (self.skip_tokens and padded) for padded in fully_padded]

    def block_len(self, fully_padded: list[bool]) -> int:
        enc = self.encoded(fully_padded)
        return sum(enc) * (self.tokens_per_view + 2) + (len(enc) - sum(enc))

    def block_len_for_size(self, w: int, h: int) -> int:
        """The same from the photo size alone (no decoding): geometry decides padding."""
        return self.block_len([False] + fully_padded_mask(resized_size(w, h, self.canvas), self.canvas, self.grid))

    def to_photo(self, xy, photo_size) -> list[float]:
        """Normalised box coordinates in the model's answers -> photo pixels (for drawing)."""
        return canvas_to_photo(xy, photo_size, self.canvas)


# ----------------------------------------------------------------------------- loading

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white; 16/32-bit images are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(a.min()), float(a.max()))
        a = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Open an image file with EXIF orientation applied, as RGB. One clear ImageError on failure."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():   # the size is checked below, with a clearer message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{path}: {img.width}x{img.height} pixels exceeds the limit of {MAX_PIXELS}")
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for non-images and truncated files
        raise ImageError(f"{path}: not a readable image ({e})") from None


# ----------------------------------------------------------------------------- tiling

def resized_size(w: int, h: int, canvas: int) -> tuple[int, int]:
    """Aspect-preserving size that fits the canvas (the longer side fills it, never below 1 px)."""
    s = canvas / max(w, h)
    return max(1, min(canvas, round(w * s))), max(1, min(canvas, round(h * s)))


def fully_padded_mask(resized: tuple[int, int], canvas: int, grid: int) -> list[bool]:
    """Which sub-images (row-major) hold no photo pixel, from geometry: the photo is at the top-left."""
    sub = canvas // grid
    w, h = resized
    return [c * sub >= w or r * sub >= h for r in range(grid) for c in range(grid)]


def tile(img: Image.Image, canvas: int = 448, grid: int = 2) -> Tiles:
    """Photo -> global view + grid x grid sub-images of canvas/grid pixels each."""
    if canvas % grid:
        raise ValueError(f"canvas {canvas} does not split into a {grid}x{grid} grid")
    img = to_rgb(img)
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"image of size {w}x{h} has no pixels")
    rw, rh = resized_size(w, h, canvas)
    board = Image.new("RGB", (canvas, canvas), (0, 0, 0))
    board.paste(img.resize((rw, rh), Image.BICUBIC), (0, 0))
    sub = canvas // grid
    pixels = torch.from_numpy(np.asarray(board, dtype=np.float32) / 255.0).permute(2, 0, 1)   # (3, C, C)
    global_view = torch.nn.functional.interpolate(pixels[None], size=(sub, sub), mode="bicubic",
                                                  align_corners=False, antialias=True)[0].clamp(0, 1)
    subs = pixels.unfold(1, sub, sub).unfold(2, sub, sub)              # (3, g, g, S, S)
    subs = subs.permute(1, 2, 0, 3, 4).reshape(grid * grid, 3, sub, sub)
    return Tiles(views=torch.cat([global_view[None], subs]).contiguous(),
                 fully_padded=[False] + fully_padded_mask((rw, rh), canvas, grid),
                 grid=grid, canvas=canvas, resized=(rw, rh))


# ----------------------------------------------------------------------------- boxes

def _axis_scales(photo_size, canvas: int):
    """Canvas units per photo pixel along x and y (the rounded resize makes them differ slightly)."""
    (w, h), (rw, rh) = photo_size, resized_size(*photo_size, canvas)
    return rw / w / canvas, rh / h / canvas


def photo_to_canvas(xy, photo_size, canvas: int) -> list[float]:
    """Photo pixel coordinates [x1, y1, x2, y2, ...] -> normalised canvas coordinates in [0, 1]."""
    sx, sy = _axis_scales(photo_size, canvas)
    return [v * (sx if i % 2 == 0 else sy) for i, v in enumerate(xy)]


def canvas_to_photo(xy, photo_size, canvas: int) -> list[float]:
    """Normalised canvas coordinates -> photo pixel coordinates (inverse of photo_to_canvas)."""
    sx, sy = _axis_scales(photo_size, canvas)
    return [v / (sx if i % 2 == 0 else sy) for i, v in enumerate(xy)]


def centered_to_photo(xy, photo_size) -> list[float]:
    """Coordinates normalised to the photo centred in a padded square (the reference's convention)
    -> photo pixels, clamped to the photo."""
    (w, h), side = photo_size, max(photo_size)
    off = ((side - w) / 2, (side - h) / 2)
    return [min(max(v * side - off[i % 2], 0.0), float(photo_size[i % 2])) for i, v in enumerate(xy)]


def format_box(xy) -> str:
    """[x1, y1, x2, y2] or [x, y] as the text the model reads and writes: 2 decimals."""
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in xy) + "]"


# A box [x1, y1, x2, y2] or a point [x, y] in the text, as format_box writes it (any decimals read).
BOX_RE = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)(?:\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?))?\s*\]")


def _values(m: re.Match) -> list[float]:
    return [float(v) for v in m.groups() if v is not None]


def labelled_boxes(text: str) -> list[tuple[str, list[float]]]:
    """'red circle [..], blue square [..]' -> [(phrase, box or point)]: each with the text between it and
    the previous box, stripped of punctuation (the label the detection format puts before each box)."""
    out, last = [], 0
    for m in BOX_RE.finditer(text):
        out.append((text[last:m.start()].strip(" ,.;:"), _values(m)))
        last = m.end()
    return out


def map_boxes(text: str, fn) -> str:
    """Every box or point of the text rewritten as format_box(fn(values))."""
    return BOX_RE.sub(lambda m: format_box(fn(_values(m))), text)
