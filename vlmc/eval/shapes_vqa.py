"""ShapesVQA: a seeded, procedural VQA benchmark with one-word answers.

Images are 112x112: a few small coloured shapes on a busy textured background, so that the handful
of 8x8 patches an object covers carry the answer and background patches are not trivially empty.
Question types: colour of a named shape, which shape has a colour, how many of a shape (0-5), whether
something exists, relative position (left/right, above/below) and size comparison.

Splits never overlap by construction: a scene belongs to the split its content hash selects
(train 80%, val 10%, test 10%), and each split only keeps the scenes it owns.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmc.errors import VlmcError

IMAGE_SIZE = 112
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
    "yellow": (240, 220, 30), "purple": (150, 50, 200), "orange": (250, 140, 20),
}
SHAPES = ["circle", "square", "triangle", "diamond"]
SIZES = {"small": (11, 14), "large": (20, 25)}  # side in pixels
QUESTION_TYPES = ("color", "shape", "count", "exist", "position", "size")
SPLITS = {"train": (0, 8), "val": (8, 9), "test": (9, 10)}  # buckets of hash % 10
_SPLIT_STREAM = {"train": 11, "val": 23, "test": 37}
COUNTS = ["0", "1", "2", "3", "4", "5"]

QUESTION_WORDS = ("what color is the which shape how many are there a left or right of above below "
                  "bigger smaller than").split()
VOCABULARY = QUESTION_WORDS + list(COLORS) + SHAPES + [s + "s" for s in SHAPES] + COUNTS + ["yes", "no"]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: int
    x: int  # centre
    y: int

    def box(self):
        h = self.size / 2
        return self.x - h, self.y - h, self.x + h, self.y + h


@dataclass(frozen=True)
class Item:
    image: np.ndarray  # uint8 [H,W,3]
    question: str
    answer: str
    qtype: str
    scene_id: str
    objects: tuple = ()  # the scene (Obj), for dense supervision and analysis


def patch_labels(objects, patch: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch colour, shape and size class (0 = background, else 1 + index; sizes: 1 small, 2 large)
    from the patch centres."""
    n = IMAGE_SIZE // patch
    colors, shapes, sizes = (np.zeros((n, n), np.int64) for _ in range(3))
    centres = np.arange(n) * patch + patch / 2
    for o in objects:
        x0, y0, x1, y1 = o.box()
        ys = (centres >= y0) & (centres <= y1)
        xs = (centres >= x0) & (centres <= x1)
        mask = ys[:, None] & xs[None, :]
        colors[mask] = 1 + list(COLORS).index(o.color)
        shapes[mask] = 1 + SHAPES.index(o.shape)
        sizes[mask] = 1 + (o.size >= SIZES["large"][0])
    return colors.reshape(-1), shapes.reshape(-1), sizes.reshape(-1)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Muted multi-scale noise plus thin lines: busy, but never in the objects' saturated colours."""
    base = rng.uniform(70, 170, size=3)
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3)) + base
    for cells, amp in ((4, 35), (14, 22), (56, 14)):
        noise = rng.normal(0, amp, size=(cells, cells, 1)) + rng.normal(0, amp / 3, size=(cells, cells, 3))
        reps = IMAGE_SIZE // cells
        img += np.kron(noise, np.ones((reps, reps, 1)))
    mean = img.mean(axis=2, keepdims=True)
    img = mean + 0.35 * (img - mean)  # desaturate: background hues stay far from the object colours
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(image: np.ndarray, objects: list[Obj], rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    scale = 4  # draw large and downsample for anti-aliased edges
    canvas = Image.fromarray(image).resize((IMAGE_SIZE * scale,) * 2, Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 7))):  # distractor lines in muted tones
        pts = [tuple(int(v) for v in rng.integers(0, IMAGE_SIZE * scale, 2)) for _ in range(2)]
        tone = tuple(int(v) for v in rng.uniform(60, 190, 1).repeat(3) + rng.normal(0, 8, 3))
        draw.line(pts, fill=tone, width=int(rng.integers(2, 6)))
    for o in objects:
        x0, y0, x1, y1 = (v * scale for v in o.box())
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.uint8)


def _scene(rng: np.random.Generator) -> list[Obj]:
    """1-6 non-overlapping objects; sometimes several of one shape so counts reach 5."""
    n = int(rng.integers(1, 7))
    repeat = rng.random() < 0.35
    favourite = SHAPES[int(rng.integers(len(SHAPES)))]
    objects: list[Obj] = []
    for _ in range(200):
        if len(objects) == n:
            break
        shape = favourite if repeat and rng.random() < 0.7 else SHAPES[int(rng.integers(len(SHAPES)))]
        lo, hi = SIZES["large" if rng.random() < 0.5 else "small"]
        size = int(rng.integers(lo, hi + 1))
        m = size // 2 + 2
        o = Obj(shape, list(COLORS)[int(rng.integers(len(COLORS)))], size,
                int(rng.integers(m, IMAGE_SIZE - m)), int(rng.integers(m, IMAGE_SIZE - m)))
        if all(max(abs(o.x - p.x) - (o.size + p.size) / 2, abs(o.y - p.y) - (o.size + p.size) / 2) > 3 for p in objects):
            objects.append(o)
    return objects


def _name(o: Obj) -> str:
    return f"{o.color} {o.shape}"


def _question(objects: list[Obj], qtype: str, rng: np.random.Generator):
    """(question, answer) of `qtype` about the scene, or None when the scene cannot ask it unambiguously."""
    by_shape = {s: [o for o in objects if o.shape == s] for s in SHAPES}
    by_color = {c: [o for o in objects if o.color == c] for c in COLORS}
    unique = [o for o in objects if sum(p.shape == o.shape and p.color == o.color for p in objects) == 1]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if qtype == "color":
        shapes = [s for s, os in by_shape.items() if len(os) == 1]
        if shapes:
            s = pick(shapes)
            return f"what color is the {s}?", by_shape[s][0].color
    elif qtype == "shape":
        colors = [c for c, os in by_color.items() if len(os) == 1]
        if colors:
            c = pick(colors)
            return f"which shape is {c}?", by_color[c][0].shape
    elif qtype == "count":
        s = pick(SHAPES)
        if len(by_shape[s]) <= 5:
            return f"how many {s}s are there?", str(len(by_shape[s]))
    elif qtype == "exist":
        if rng.random() < 0.5:
            return f"is there a {_name(pick(objects))}?", "yes"
        present = {(o.color, o.shape) for o in objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = pick(absent)
        return f"is there a {c} {s}?", "no"
    elif qtype in ("position", "size") and len(unique) >= 2:
        i, j = rng.choice(len(unique), size=2, replace=False)
        a, b = unique[int(i)], unique[int(j)]
        if qtype == "size":
            if abs(a.size - b.size) >= 6:
                return f"is the {_name(a)} bigger or smaller than the {_name(b)}?", "bigger" if a.size > b.size else "smaller"
        elif rng.random() < 0.5 and abs(a.x - b.x) >= 8:
            return f"is the {_name(a)} left or right of the {_name(b)}?", "left" if a.x < b.x else "right"
        elif abs(a.y - b.y) >= 8:
            return f"is the {_name(a)} above or below the {_name(b)}?", "above" if a.y < b.y else "below"
    return None


def scene_questions(objects, rng: np.random.Generator, k: int, types=QUESTION_TYPES) -> list[tuple[str, str, str]]:
    """Up to k more (question, answer, type) of `types` about one scene, for multi-turn training sequences."""
    out: list[tuple[str, str, str]] = []
    for _ in range(4 * k):
        if len(out) == k:
            break
        qtype = types[int(rng.integers(len(types)))]
        qa = _question(list(objects), qtype, rng)
        if qa is not None and all(qa[0] != q for q, _, _ in out):
            out.append((qa[0], qa[1], qtype))
    return out


def _scene_id(objects: list[Obj]) -> str:
    return hashlib.sha256(repr(objects).encode()).hexdigest()[:16]


def generate(split: str, index: int) -> Item:
    """Item `index` of `split`: deterministic, and only from scenes the split owns."""
    if split not in SPLITS:
        raise VlmcError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    lo, hi = SPLITS[split]
    attempt = 0
    while True:
        rng = np.random.default_rng([_SPLIT_STREAM[split], index, attempt])
        attempt += 1
        objects = _scene(rng)
        sid = _scene_id(objects)
        if not lo <= int(sid, 16) % 10 < hi:
            continue
        qtype = QUESTION_TYPES[(index + attempt) % len(QUESTION_TYPES)] if rng.random() < 0.5 else QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
        qa = _question(objects, qtype, rng)
        if qa is None:
            continue
        image = _draw(_background(rng), objects, rng)
        return Item(image, qa[0], qa[1], qtype, sid, tuple(objects))


def items(split: str, n: int, start: int = 0):
    for i in range(start, start + n):
        yield generate(split, i)


def write(split: str, n: int, out: Path) -> Path:
    """Write n items as PNGs plus questions.jsonl (image, question, answer, type) for people and `vlmc eval`."""
    from PIL import Image

    if n < 1:
        raise VlmcError("--n must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(items(split, n)):
        name = f"{split}_{i:05d}.png"
        Image.fromarray(item.image).save(out / name)
        lines.append(json.dumps({"image": name, "question": item.question, "answer": item.answer, "type": item.qtype}))
    path = out / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
