"""Text images rendered here, deterministically, for the OCR models that ship inside `rapidocr-onnxruntime`.

Nothing is downloaded: lines and pages are drawn with Pillow in the DejaVu fonts installed on the machine, so
the ground truth (the string, its orientation, the boxes of text on a page) is exact. The inputs follow the
PaddleOCR conventions of the package's own pipeline (RGB scaled to [-1, 1]; a line resized to height 48 keeping
its aspect ratio and padded with zeros to the model's width), so the original models read them as they read
photographs of text.

`python -m bench.textdata lines OUT.npz [--n N] [--seed S]` writes a `--data` file for the orientation
classifier: `x` N×3×48×192 float32, `y` 0 (upright) or 1 (rotated by 180°), `text` the strings.
"""

from __future__ import annotations

import argparse
import glob
import string

import numpy as np

ALPHABET = string.ascii_letters + string.digits + "  .,:-/()%"
LINE_SHAPE = (48, 192)  # height, width of the orientation classifier's input


def fonts() -> list[str]:
    """The DejaVu TrueType files on this machine, sorted (the same list on every run)."""
    found = sorted(glob.glob("/usr/share/fonts/**/DejaVu*.ttf", recursive=True))
    if not found:
        raise RuntimeError("no DejaVu fonts under /usr/share/fonts: install fonts-dejavu-core")
    return found


def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def random_text(rng: np.random.Generator, low: int = 4, high: int = 18) -> str:
    n = int(rng.integers(low, high + 1))
    text = "".join(rng.choice(list(ALPHABET), size=n)).strip()
    return text or "text"


def render_line(text: str, font_path: str, size: int, ink: int = 0, paper: int = 255, pad: int = 4):
    """One line of text on plain paper, cropped to the text with `pad` pixels around: an RGB uint8 array."""
    from PIL import Image, ImageDraw

    font = _font(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    image = Image.new("RGB", (max(w, 1), max(h, 1)), (paper,) * 3)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=(ink,) * 3)
    return np.asarray(image)


def normalise_line(rgb: np.ndarray, shape: tuple[int, int] = LINE_SHAPE) -> np.ndarray:
    """PaddleOCR's classifier input: resized to the model's height keeping the aspect ratio (at most its
    width), scaled to [-1, 1], padded on the right with zeros. 3×H×W float32."""
    from PIL import Image

    height, width = shape
    h, w = rgb.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(rgb).resize((resized_w, height), Image.BILINEAR), dtype=np.float32)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def text_lines(n: int, seed: int = 0, shape: tuple[int, int] = LINE_SHAPE):
    """`n` rendered lines, half of them rotated by 180° (label 1): x (n×3×H×W float32), y, strings.

    Font, size, ink and paper grey level vary per line; the label is balanced and shuffled."""
    rng = np.random.default_rng(seed)
    paths = fonts()
    xs, ys, texts = [], [], []
    for i in range(n):
        text = random_text(rng)
        ink, paper = int(rng.integers(0, 90)), int(rng.integers(180, 256))
        rgb = render_line(text, paths[int(rng.integers(len(paths)))], int(rng.integers(20, 40)), ink, paper)
        flipped = i % 2 == 1
        if flipped:
            rgb = rgb[::-1, ::-1]
        xs.append(normalise_line(np.ascontiguousarray(rgb), shape))
        ys.append(int(flipped))
        texts.append(text)
    order = rng.permutation(n)
    return (np.stack(xs)[order], np.asarray(ys, dtype=np.int64)[order], np.asarray(texts)[order])


def text_pages(n: int, seed: int = 0, size: tuple[int, int] = (320, 320), lines: tuple[int, int] = (3, 8)):
    """`n` pages (H×W) with a few lines of text each: x (n×3×H×W float32, scaled to [-1, 1] as the package's
    detector expects) and the text mask (n×H×W bool: the pixels inside a line's box)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    paths = fonts()
    height, width = size
    xs, masks = [], []
    for _ in range(n):
        paper = int(rng.integers(200, 256))
        image = Image.new("RGB", (width, height), (paper,) * 3)
        draw = ImageDraw.Draw(image)
        mask = np.zeros((height, width), dtype=bool)
        y = int(rng.integers(4, 20))
        for _ in range(int(rng.integers(lines[0], lines[1] + 1))):
            font = _font(paths[int(rng.integers(len(paths)))], int(rng.integers(14, 30)))
            text = random_text(rng, 3, 24)
            left, top, right, bottom = font.getbbox(text)
            x = int(rng.integers(4, max(5, width // 3)))
            if y + bottom - top + 4 > height:
                break
            draw.text((x - left, y - top), text, font=font, fill=(int(rng.integers(0, 80)),) * 3)
            mask[y:y + bottom - top, x:min(width, x + right - left)] = True
            y += bottom - top + int(rng.integers(6, 24))
        xs.append((np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)
        masks.append(mask)
    return np.stack(xs), np.stack(masks)


# ---- lines for the recogniser -----------------------------------------------------------------------------------
REC_ALPHABET = "abdefghijkmnpqrtuy" + "ABDEFGHJKLMNPQRTUY" + "2346789"
"""Characters a reader can tell apart in any upright DejaVu face: no l/I/1, o/O/0, no letter whose capital is its
small letter drawn larger (c, s, v, w, x, z), no 5/S. With them a random string is ambiguous to anyone (PaddleOCR's
recogniser read `dj9l` as `dj91` and `P6QOC8` as `P6Q0C8`), and a lost line says nothing about the model; the
original's accuracy on these lines is in `bench/results/separation.json`."""
REC_LINE_SHAPE = (48, 160)  # height, width: the recogniser's input at height 48, 20 CTC steps at width 160


def upright_fonts() -> list[str]:
    """The DejaVu faces without slant (oblique/italic), the hairline face and the TeX math face: the original
    recogniser misread those far more often than the upright ones (checked by hand on a few hundred lines)."""
    skip = ("Oblique", "Italic", "ExtraLight", "Math")
    return [p for p in fonts() if not any(k in p for k in skip)]


def rec_lines(n: int, seed: int, shape: tuple[int, int] = REC_LINE_SHAPE, length: tuple[int, int] = (3, 8),
              sizes: tuple[int, int] = (20, 40)):
    """`n` lines of random strings of `REC_ALPHABET` (length drawn in `length`, inclusive) for the text recogniser:
    x (n×3×H×W float32, PaddleOCR's recogniser input: height H keeping the aspect ratio, [-1, 1], zero-padded on the
    right) and the strings. Face (`upright_fonts`), size in `sizes`, ink and paper grey vary per line. Different
    seeds give the train, validation and test splits; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    paths = upright_fonts()
    xs, texts = [], []
    for _ in range(n):
        text = "".join(rng.choice(list(REC_ALPHABET), size=int(rng.integers(length[0], length[1] + 1))))
        ink, paper = int(rng.integers(0, 90)), int(rng.integers(180, 256))
        rgb = render_line(text, paths[int(rng.integers(len(paths)))], int(rng.integers(sizes[0], sizes[1] + 1)),
                          ink, paper)
        xs.append(normalise_line(rgb, shape))
        texts.append(text)
    return np.stack(xs), np.asarray(texts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.textdata", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["lines"])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x, y, text = text_lines(args.n, args.seed)
    np.savez(args.out, x=x, y=y, text=text)
    print(f"{args.out}: {len(x)} lines, {int(y.sum())} rotated")


if __name__ == "__main__":
    main()
