"""tiling.py on real photos (scikit-image) and edge cases: skip decisions, views, boxes, image modes."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

import tiling as T

skimage_data = pytest.importorskip("skimage.data")


def crop_to(photo: np.ndarray, rw: int, rh: int) -> Image.Image:
    """The largest centred crop of a real photo with aspect rw:rh."""
    h, w = photo.shape[:2]
    cw, ch = (w, w * rh // rw) if w * rh // rw <= h else (h * rw // rh, h)
    y, x = (h - ch) // 2, (w - cw) // 2
    return Image.fromarray(photo[y:y + ch, x:x + cw])


PHOTOS = {"chelsea": skimage_data.chelsea, "astronaut": skimage_data.astronaut,
          "coffee": skimage_data.coffee, "rocket": skimage_data.rocket}

# aspect (w:h) -> skipped sub-images on 2x2 (canvas 448) and on 3x3 (canvas 672)
EXPECTED_SKIPS = {(1, 1): (0, 0), (4, 3): (0, 0), (2, 1): (2, 3), (1, 2): (2, 3), (3, 1): (2, 6), (1, 3): (2, 6)}


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("aspect", EXPECTED_SKIPS)
def test_real_photos_skip_counts(name, aspect):
    img = crop_to(PHOTOS[name](), *aspect)
    for (canvas, grid), expected in zip(((448, 2), (672, 3)), EXPECTED_SKIPS[aspect]):
        t = T.tile(img, canvas, grid)
        assert t.views.shape == (1 + grid * grid, 3, canvas // grid, canvas // grid)
        assert t.n_fully_padded == expected, (name, aspect, canvas, t.resized)
        assert not t.fully_padded[0]                       # the global view is always encoded
        for v, padded in zip(t.views[1:], t.fully_padded[1:]):
            if padded:                                      # geometry says padded -> truly no photo pixel
                assert v.abs().max() == 0


def test_wide_photo_layout_row_major():
    img = crop_to(skimage_data.astronaut(), 2, 1)
    t = T.tile(img, 448, 2)
    assert t.fully_padded == [False, False, False, True, True]    # top row kept, bottom row skipped
    canvas = np.zeros((448, 448, 3), np.float32)
    canvas[: t.resized[1], : t.resized[0]] = np.asarray(img.resize(t.resized, Image.BICUBIC), np.float32) / 255
    torch.testing.assert_close(t.views[2], torch.from_numpy(canvas[:224, 224:]).permute(2, 0, 1))
    tall = T.tile(crop_to(skimage_data.astronaut(), 1, 2), 448, 2)
    assert tall.fully_padded == [False, False, True, False, True]  # right column skipped


def test_edge_cases():
    one = T.tile(Image.new("RGB", (1, 1), (200, 10, 10)), 448, 2)
    assert one.resized == (448, 448) and one.n_fully_padded == 0
    thin = T.tile(Image.new("RGB", (1, 4000), (9, 9, 9)), 448, 2)
    assert thin.resized == (1, 448) and thin.fully_padded == [False, False, True, False, True]
    assert T.tile(Image.new("RGB", (1, 4000)), 672, 3).n_fully_padded == 6
    # An all-black photo looks exactly like padding, and is never skipped: geometry decides.
    black = T.tile(Image.new("RGB", (600, 600)), 448, 2)
    assert black.n_fully_padded == 0 and black.views.abs().max() == 0
    assert T.tile(Image.new("RGB", (800, 400)), 448, 2).n_fully_padded == 2


def test_boxes_round_trip_within_a_pixel():
    rng = random.Random(0)
    for name, aspect in [("chelsea", (1, 1)), ("coffee", (4, 3)), ("rocket", (1, 3)), ("astronaut", (3, 1))]:
        img = crop_to(PHOTOS[name](), *aspect)
        t = T.tile(img, 448, 2)
        w, h = img.size
        for _ in range(50):
            x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
            y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
            norm = T.photo_to_canvas([x1, y1, x2, y2], img.size, 448)
            assert all(0 <= v <= max(t.resized) / 448 + 1e-9 for v in norm)
            back = T.canvas_to_photo(norm, img.size, 448)
            assert max(abs(a - b) for a, b in zip(back, [x1, y1, x2, y2])) < 1.0
            # Through the 2-decimal text format: at most half a hundredth of the canvas.
            text = T.format_box(norm)
            parsed = [float(v) for v in text.strip("[]").split(",")]
            back = T.canvas_to_photo(parsed, img.size, 448)
            tol = 0.005 * 448 * max(w / t.resized[0], h / t.resized[1]) + 1e-6
            assert max(abs(a - b) for a, b in zip(back, [x1, y1, x2, y2])) <= tol
        full = T.photo_to_canvas([0, 0, w, h], img.size, 448)
        assert full == pytest.approx([0, 0, t.resized[0] / 448, t.resized[1] / 448])


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,make,expected", [
    ("RGB", lambda: Image.new("RGB", (4, 2), (10, 20, 30)), (10, 20, 30)),
    ("L", lambda: Image.new("L", (4, 2), 77), (77, 77, 77)),
    ("LA", lambda: Image.new("LA", (4, 2), (0, 0)), (255, 255, 255)),          # transparent -> white
    ("P", lambda: Image.new("RGB", (4, 2), (0, 128, 255)).convert("P", palette=Image.ADAPTIVE), (0, 128, 255)),
    ("RGBA", lambda: Image.new("RGBA", (4, 2), (100, 0, 0, 255)), (100, 0, 0)),
    ("CMYK", lambda: Image.new("CMYK", (4, 2), (0, 0, 0, 0)), (255, 255, 255)),
    ("I;16", lambda: Image.fromarray(np.full((2, 4), 65535, np.uint16)), (255, 255, 255)),
])
def test_any_mode_to_rgb(mode, make, expected, tmp_path):
    img = make()
    assert img.mode == mode
    fmt = {"CMYK": "JPEG"}.get(mode, "PNG")
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encode(img, fmt))
    rgb = T.load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (4, 2)
    assert np.abs(np.asarray(rgb, np.int32) - np.array(expected)).max() <= 2
    assert T.tile(rgb, 64, 2).n_fully_padded == 2


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(skimage_data.chelsea()).crop((0, 0, 400, 200))      # 2:1 landscape
    exif = Image.Exif()
    exif[0x0112] = 6                                                          # rotate 90 degrees on display
    (tmp_path / "rot.jpg").write_bytes(_encode(img, "JPEG", exif=exif))
    loaded = T.load_image(tmp_path / "rot.jpg")
    assert loaded.size == (200, 400)
    assert T.tile(loaded, 448, 2).fully_padded == [False, False, True, False, True]


def test_bad_files_give_one_clear_error(tmp_path):
    with pytest.raises(T.ImageError, match="missing.jpg: no such file"):
        T.load_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("this is not an image")
    with pytest.raises(T.ImageError, match="notes.jpg: not a readable image"):
        T.load_image(tmp_path / "notes.jpg")
    data = _encode(Image.fromarray(skimage_data.coffee()), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(T.ImageError, match="cut.jpg: not a readable image"):
        T.load_image(tmp_path / "cut.jpg")
    Image.new("1", (10_000, 9_000)).save(tmp_path / "bomb.png")
    with pytest.raises(T.ImageError, match="bomb.png: 10000x9000 pixels exceeds the limit"):
        T.load_image(tmp_path / "bomb.png")
