"""A procedurally generated scene world: coloured shapes on plain or textured backgrounds.

Every scene is a pure function of ``(seed, split, index)``, so splits are reproducible without
storing images. Each scene comes with single-word VQA questions of several types, a short caption,
and dense per-patch labels (object colour, object shape, background kind) that stand in for a
pretrained CLIP when the tiny vision tower is trained.

Scenes are drawn at ``supersample`` times the target size and box-filtered down, so edges are
anti-aliased like a photo rather than aliased like a bitmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError
from .base import CAPTION_PROMPT, VQA_SUFFIX, Sample

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45), "green": (45, 170, 70), "blue": (50, 90, 225), "yellow": (235, 205, 40),
    "purple": (145, 60, 195), "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
#: Background kinds; each is drawn in a dark or mid tone so that every object colour stays visible.
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "noise")
BACKGROUND_TONES: tuple[tuple[int, int, int], ...] = ((90, 90, 90), (70, 55, 40), (40, 60, 70), (60, 60, 80))
COUNT_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = {"train": 0, "calibration": 1, "test": 2}
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "position", "background")


#: Image side of the tiny model family (``TinyRecipe.image_size``): the default scenes of :func:`synthetic_samples`.
TINY_IMAGE_SIZE = 32


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. ``object_size`` is a fraction of the image side."""

    size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    object_size: tuple[float, float] = (0.28, 0.40)
    supersample: int = 4

    def __post_init__(self) -> None:
        if self.size < 16:
            raise InputError(f"scene size {self.size} px is too small (at least 16)")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise InputError(f"object counts must satisfy 1 <= min <= max <= 4, got {self.min_objects}, {self.max_objects}")


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the final image

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """A drawn scene: the image, its objects and its per-pixel object map.

    Attributes:
        image: RGB ``PIL.Image`` of ``config.size`` px.
        objects: the objects, in drawing order.
        background: one of :data:`BACKGROUNDS`.
        object_map: ``[S*ss, S*ss]`` int array at supersampled resolution: -1 background, else object index.
    """

    image: Image.Image
    objects: list[SceneObject]
    background: str
    object_map: np.ndarray
    config: SceneConfig
    index: int = 0
    split: str = "train"

    def patch_labels(self, patch: int) -> dict[str, np.ndarray]:
        """Dense labels of a ``patch``-px grid: ``color``/``shape`` ``[rows, cols]`` (0 = background,
        else 1 + index into :data:`COLORS` / :data:`SHAPES`), plus ``background`` (a scalar kind id)."""
        ss = self.config.supersample
        cell = patch * ss
        rows = self.object_map.shape[0] // cell
        color = np.zeros((rows, rows), dtype=np.int64)
        shape = np.zeros((rows, rows), dtype=np.int64)
        colors, shapes = list(COLORS), list(SHAPES)
        for r in range(rows):
            for c in range(rows):
                block = self.object_map[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
                ids, counts = np.unique(block[block >= 0], return_counts=True)
                if len(ids) and counts.max() >= 0.25 * block.size:
                    obj = self.objects[int(ids[np.argmax(counts)])]
                    color[r, c] = 1 + colors.index(obj.color)
                    shape[r, c] = 1 + shapes.index(obj.shape)
        return {"color": color, "shape": shape, "background": np.int64(BACKGROUNDS.index(self.background))}

    def caption(self) -> str:
        """Objects from left to right, e.g. ``"a red circle and a blue ring on a striped background ."``."""
        names = [f"a {o.name}" for o in sorted(self.objects, key=lambda o: o.center[0])]
        listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
        bg = {"plain": "plain", "stripes": "striped", "dots": "dotted", "noise": "noisy"}[self.background]
        return f"{listed} on a {bg} background ."


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], fill, background) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        t = w / 3
        draw.rectangle([x0 + t, y0, x1 - t, y1], fill=fill)
        draw.rectangle([x0, y0 + t, x1, y1 - t], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        m = w * 0.27
        draw.ellipse([x0 + m, y0 + m, x1 - m, y1 - m], fill=background)
    else:  # pragma: no cover - guarded by SHAPES
        raise InputError(f"unknown shape {shape!r}")


def _background(kind: str, tone: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    base = np.empty((n, n, 3), dtype=np.float32)
    base[:] = tone
    yy, xx = np.mgrid[0:n, 0:n]
    if kind == "stripes":
        period = n / rng.choice([5.0, 6.0, 8.0])
        on = ((xx + yy * rng.choice([0, 1])) // (period / 2)) % 2 == 0
        base[on] += 45
    elif kind == "dots":
        period = n / rng.choice([6.0, 8.0])
        cy, cx = (yy % period) - period / 2, (xx % period) - period / 2
        base[(cy**2 + cx**2) < (period * 0.22) ** 2] += 60
    elif kind == "noise":
        base += rng.normal(0, 28, size=(n, n, 1)).repeat(3, axis=2)
    return np.clip(base, 0, 255)


class SyntheticWorld:
    """Seeded scene generator with questions, captions and deterministic splits.

    Args:
        seed: world seed; ``(seed, split, index)`` fixes a scene.
        config: drawing settings.
        vqa_suffix: appended to every question (LLaVA-1.5's short-answer instruction by default).
    """

    def __init__(self, seed: int = 0, config: SceneConfig | None = None, vqa_suffix: str | None = VQA_SUFFIX):
        self.seed = int(seed)
        self.config = config or SceneConfig()
        self.vqa_suffix = vqa_suffix

    # ------------------------------------------------------------------ scenes
    def _rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; splits: {list(SPLITS)}")
        if index < 0:
            raise InputError(f"scene index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, SPLITS[split], int(index), stream])

    def scene(self, split: str, index: int) -> Scene:
        """The ``index``-th scene of ``split`` (always the same)."""
        cfg = self.config
        rng = self._rng(split, index)
        ss = cfg.supersample
        n = cfg.size * ss
        kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        tone = BACKGROUND_TONES[int(rng.integers(len(BACKGROUND_TONES)))]
        canvas = _background(kind, tone, n, rng)
        img = Image.fromarray(canvas.astype(np.uint8))
        labels = Image.new("I", (n, n), -1)
        draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(labels)
        n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        combos = [(c, s) for c in COLORS for s in SHAPES]
        chosen = [combos[i] for i in rng.choice(len(combos), size=n_obj, replace=False)]
        objects: list[SceneObject] = []
        for color, shape in chosen:
            for _ in range(50):  # rejection-sample a free spot
                side = rng.uniform(*cfg.object_size) * cfg.size
                x0 = rng.uniform(0, cfg.size - side)
                y0 = rng.uniform(0, cfg.size - side)
                box = (x0, y0, x0 + side, y0 + side)
                if all(box[0] > o.box[2] + 1 or box[2] + 1 < o.box[0] or box[1] > o.box[3] + 1 or box[3] + 1 < o.box[1]
                       for o in objects):
                    break
            else:
                continue
            big = [v * ss for v in box]
            _draw_shape(draw, shape, big, COLORS[color], tuple(int(t) for t in tone))
            _draw_shape(ldraw, shape, big, len(objects), -1)
            objects.append(SceneObject(color, shape, box))
        image = img.resize((cfg.size, cfg.size), Image.Resampling.BOX)
        return Scene(image, objects, kind, np.asarray(labels, dtype=np.int64), cfg, index, split)

    # ------------------------------------------------------------------ questions
    def questions(self, scene: Scene, rng: np.random.Generator | None = None) -> list[tuple[str, str, str]]:
        """Every answerable question about ``scene`` as ``(type, question, answer)``, shuffled."""
        rng = rng or self._rng(scene.split, scene.index, stream=1)
        objs = scene.objects
        out: list[tuple[str, str, str]] = []
        shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
        color_counts = {c: sum(o.color == c for o in objs) for c in COLORS}
        for o in objs:
            if shape_counts[o.shape] == 1:
                out.append(("color", f"what color is the {o.shape} ?", o.color))
            if color_counts[o.color] == 1:
                out.append(("shape", f"what shape is the {o.color} object ?", o.shape))
            dx = o.center[0] - scene.config.size / 2
            if abs(dx) > 0.12 * scene.config.size:
                out.append(("position", f"is the {o.name} on the left or the right ?", "left" if dx < 0 else "right"))
        out.append(("count", "how many objects are there ?", COUNT_WORDS[len(objs)]))
        present = {(o.color, o.shape) for o in objs}
        pos = objs[int(rng.integers(len(objs)))]
        out.append(("exists", f"is there a {pos.name} ?", "yes"))
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        out.append(("exists", f"is there a {c} {s} ?", "no"))
        out.append(("background", "what kind of background is it ?", scene.background))
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    def prompt(self, question: str) -> str:
        return f"{question}\n{self.vqa_suffix}" if self.vqa_suffix else question

    def samples(self, split: str, n: int, *, start: int = 0, task: str = "vqa",
                question_types: Sequence[str] | None = None) -> list[Sample]:
        """``n`` samples from scenes ``start, start+1, ...``: one question per scene (types balanced by
        scene index among those the scene can answer; scenes with none of ``question_types`` are
        skipped), or the caption task (``task="caption"``)."""
        if task not in ("vqa", "caption"):
            raise InputError(f"task must be 'vqa' or 'caption', got {task!r}")
        types = tuple(question_types or QUESTION_TYPES)
        bad = [t for t in types if t not in QUESTION_TYPES]
        if bad:
            raise InputError(f"unknown question types {bad}; types: {QUESTION_TYPES}")
        out = []
        i = start
        while len(out) < n:
            scene = self.scene(split, i)
            sid = f"synthetic/{self.seed}/{split}/{i}"
            if task == "caption":
                cap = scene.caption()
                out.append(Sample(scene.image, CAPTION_PROMPT, cap, (cap,), "caption", sid + "/caption",
                                  {"split": split, "index": i}))
                i += 1
                continue
            rng = self._rng(split, i, stream=2)
            qs = self.questions(scene, rng)
            wanted = types[i % len(types)]
            pick = next((q for q in qs if q[0] == wanted), None) or next((q for q in qs if q[0] in types), None)
            if pick is not None:  # scenes that cannot answer any requested type are skipped
                qtype, question, answer = pick
                out.append(Sample(scene.image, self.prompt(question), answer, (answer,), "vqa", f"{sid}/{qtype}",
                                  {"split": split, "index": i, "question_type": qtype}))
            i += 1
        return out

    def conversations(self, split: str, indices: Sequence[int], turns: int = 3, *, epoch: int = 0,
                      caption_prob: float = 0.15, suffix_first_only: bool = True, repeat_prob: float = 0.0,
                      repeat_words: Sequence[str] = ()) -> Iterator[tuple[Scene, list[tuple[str, str]]]]:
        """Multi-turn training conversations: ``(scene, [(prompt, answer), ...])`` with ``turns`` turns.

        Questions are re-drawn every ``epoch``; with probability ``caption_prob`` one turn is the
        caption task. The first turn is exactly a test-time prompt; with ``suffix_first_only`` later
        turns ask the bare question (shorter sequences, as in LLaVA's multi-turn data). With
        probability ``repeat_prob`` a later turn is a text-only task, ``"repeat the words : w1 .. wk"``
        with 3 to 6 words drawn uniformly from ``repeat_words``: a little general language ability,
        so that the language model can produce any word of its vocabulary (as a real LLM can).
        """
        for i in indices:
            scene = self.scene(split, int(i))
            rng = self._rng(split, int(i), stream=10 + epoch)
            qs = self.questions(scene, rng)
            conv = [(self.prompt(q) if t == 0 or not suffix_first_only else q, a)
                    for t, (_, q, a) in enumerate(qs[:turns])]
            if rng.random() < caption_prob:
                conv[int(rng.integers(len(conv)))] = (CAPTION_PROMPT, scene.caption())
            if repeat_words and len(conv) > 1 and rng.random() < repeat_prob:
                words = " ".join(rng.choice(list(repeat_words), size=int(rng.integers(3, 7))))
                conv[int(rng.integers(1, len(conv)))] = (f"repeat the words : {words}", words)
            yield scene, conv

    def vocabulary(self) -> list[str]:
        """Every word the world can produce (questions, answers, captions, prompts), sorted."""
        words: set[str] = set()
        text = " ".join([
            " ".join(COLORS), " ".join(SHAPES), " ".join(BACKGROUNDS), " ".join(COUNT_WORDS),
            "what color is the shape object how many objects are there is there a on the left or right",
            "kind of background it yes no and , . ? striped dotted noisy plain repeat words :", CAPTION_PROMPT.lower(),
            (self.vqa_suffix or "").lower(),
        ])
        for w in text.replace(".", " . ").replace("?", " ? ").replace(",", " , ").split():
            words.add(w)
        return sorted(words)


def synthetic_samples(split: str, n: int, seed: int = 0, size: int = TINY_IMAGE_SIZE) -> list[Sample]:
    """``n`` samples of ``split`` (train, calibration or test) of the tiny family's world: scenes of
    ``size`` px (default the tiny models' :data:`TINY_IMAGE_SIZE`), drawn with ``seed``."""
    return SyntheticWorld(seed, SceneConfig(size=size)).samples(split, n)
