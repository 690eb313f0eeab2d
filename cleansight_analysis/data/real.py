"""Loaders for the paper's real datasets (COCO captions, VQAv2, OK-VQA, Flickr8k) from local folders.

Nothing is downloaded: every loader reads a folder that already holds the dataset in its standard
published layout and returns ``list[Sample]`` whose ``image`` fields are file paths (``str``); the
images themselves are opened later, by whoever consumes the samples.

Common behaviour of every loader:

* order is deterministic: the order of the dataset's own files (image list, question list or
  split list);
* ``limit=None`` returns everything; with an integer ``limit`` and ``seed=None`` the first
  ``limit`` samples are returned, and with both ``limit`` and a ``seed`` (the default ``seed=0``)
  a seeded random subset of ``limit`` samples, kept in file order;
* ``sample_id`` is ``"<dataset>/<split>/<id>"``, e.g. ``"vqav2/val2014/262148000"``;
* a missing root, annotation file or image folder, malformed JSON, an entry lacking a required
  field, or a question/image without its annotation raises :class:`~cleansight_analysis.errors.DatasetError`
  naming the file or folder and what was expected.

The image folder is located by trying a few documented candidates in order and taking the first
one that holds the first selected sample's image; individual images are not checked one by one.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DatasetError
from .base import CAPTION_PROMPT, VQA_SUFFIX, Sample
from .vqa_eval import vqa_normalize, vqa_score

__all__ = [
    "DATASET_LOADERS",
    "load_coco_captions",
    "load_dataset_folder",
    "load_flickr8k",
    "load_okvqa",
    "load_vqav2",
    "vqa_normalize",
    "vqa_score",
]

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# shared helpers


def _clean_text(text: str) -> str:
    """Strip and collapse internal whitespace to single spaces."""
    return " ".join(text.split())


def _check_root(root: Any, dataset: str, layout: str) -> Path:
    if root is None:
        raise DatasetError(f"{dataset}: no dataset root given; expected a folder laid out as {layout}")
    try:
        path = Path(os.fspath(root)).expanduser()
    except TypeError as exc:
        raise DatasetError(f"{dataset}: dataset root must be a path, got {type(root).__name__}: {root!r}") from exc
    if not path.exists():
        raise DatasetError(f"{dataset}: dataset root {str(path)!r} does not exist; expected a folder laid out as {layout}")
    if not path.is_dir():
        raise DatasetError(f"{dataset}: dataset root {str(path)!r} is not a folder; expected a folder laid out as {layout}")
    return path


def _require_file(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{dataset}: missing {what}: expected the file {str(path)!r}")
    return path


def _read_json(path: Path, dataset: str, what: str) -> Any:
    _require_file(path, dataset, what)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{dataset}: {what} {str(path)!r} is not valid JSON "
            f"(line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{dataset}: {what} {str(path)!r} is not UTF-8 text: {exc}") from exc


def _json_list(data: Any, key: str, path: Path, dataset: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise DatasetError(
            f"{dataset}: {str(path)!r} should be a JSON object with a list under {key!r}; found {found}"
        )
    return data[key]


def _field(entry: Any, key: str, path: Path, index: int, dataset: str, kind: type | tuple = object) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DatasetError(f"{dataset}: entry #{index} of {str(path)!r} has no {key!r} field: {entry!r:.200}")
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DatasetError(
            f"{dataset}: entry #{index} of {str(path)!r} has a malformed {key!r} field "
            f"({type(value).__name__}: {value!r:.100})"
        )
    return value


def _select(items: Sequence[T], limit: int | None, seed: int | None) -> list[T]:
    """All items, the first ``limit``, or a seeded random ``limit``-subset kept in original order."""
    if limit is None:
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DatasetError(f"limit must be None or a non-negative integer, got {limit!r}")
    if limit >= len(items):
        return list(items)
    if seed is None:
        return list(items[:limit])
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def _find_image_dir(candidates: Sequence[Path], probe: str | None, dataset: str) -> Path | None:
    """The first candidate folder holding ``probe``; ``None`` only when there is nothing to probe."""
    looked = ", ".join(repr(str(c)) for c in candidates)
    existing = [c for c in candidates if c.is_dir()]
    if not existing:
        raise DatasetError(f"{dataset}: no image folder found; looked for the folders {looked}")
    if probe is None:
        return existing[0]
    for folder in existing:
        if (folder / probe).is_file():
            return folder
    raise DatasetError(
        f"{dataset}: image {probe!r} was not found in any candidate image folder; looked in {looked}"
    )


def _coco_image_split(split: str) -> str:
    # VQAv2's test-dev questions refer to the test2015 images.
    return "test" + split[len("test-dev"):] if split.startswith("test-dev") else split


# --------------------------------------------------------------------------------------------------
# COCO captions


def load_coco_captions(
    root: str | os.PathLike,
    split: str = "val2017",
    *,
    limit: int | None = None,
    seed: int | None = 0,
    prompt: str = CAPTION_PROMPT,
) -> list[Sample]:
    """Load COCO captions (2017 layout) as one captioning sample per image.

    Expects ``root/annotations/captions_{split}.json`` (a JSON object with ``"images"``, each with
    ``id`` and ``file_name``, and ``"annotations"``, each with ``image_id`` and ``caption``) and the
    pictures in ``root/{split}/`` (also accepted: ``root/images/{split}/``, ``root/images/``,
    ``root/``).  Samples follow the order of ``"images"``; ``answer`` is the image's first caption
    in file order and ``references`` all its captions, each with whitespace collapsed.
    ``sample_id`` is ``"coco/{split}/{image_id}"`` and ``meta`` holds ``image_id`` and ``file_name``.

    Args:
        root: the COCO folder.
        split: e.g. ``"val2017"`` or ``"train2017"`` (``"val2014"`` works with the same layout).
        limit, seed: see the module docstring.
        prompt: the instruction stored in every sample.

    Raises:
        DatasetError: missing root/annotation file/image folder, malformed JSON, an image with no
            caption, or a caption pointing at an unknown image.
    """
    dataset = "coco"
    layout = f"root/annotations/captions_{split}.json plus images in root/{split}/"
    base = _check_root(root, dataset, layout)
    ann_path = base / "annotations" / f"captions_{split}.json"
    data = _read_json(ann_path, dataset, "caption annotation file")
    images = _json_list(data, "images", ann_path, dataset)
    annotations = _json_list(data, "annotations", ann_path, dataset)

    captions: dict[int, list[str]] = {}
    order: list[tuple[int, str]] = []
    for i, img in enumerate(images):
        image_id = _field(img, "id", ann_path, i, dataset, int)
        file_name = _field(img, "file_name", ann_path, i, dataset, str)
        if image_id not in captions:
            captions[image_id] = []
            order.append((image_id, file_name))
    for i, ann in enumerate(annotations):
        image_id = _field(ann, "image_id", ann_path, i, dataset, int)
        caption = _field(ann, "caption", ann_path, i, dataset, str)
        if image_id not in captions:
            raise DatasetError(
                f"{dataset}: caption annotation #{i} of {str(ann_path)!r} refers to image_id {image_id}, "
                "which is not listed under 'images'"
            )
        captions[image_id].append(_clean_text(caption))
    for image_id, file_name in order:
        if not captions[image_id]:
            raise DatasetError(
                f"{dataset}: image {image_id} ({file_name!r}) in {str(ann_path)!r} has no caption annotation"
            )

    chosen = _select(order, limit, seed)
    folder = _find_image_dir(
        [base / split, base / "images" / split, base / "images", base],
        chosen[0][1] if chosen else None,
        dataset,
    )
    return [
        Sample(
            image=str(folder / file_name),
            prompt=prompt,
            answer=captions[image_id][0],
            references=tuple(captions[image_id]),
            task="caption",
            sample_id=f"{dataset}/{split}/{image_id}",
            meta={"image_id": image_id, "file_name": file_name},
        )
        for image_id, file_name in chosen
    ]


# --------------------------------------------------------------------------------------------------
# VQAv2 / OK-VQA


def _majority_answer(answers: Sequence[str]) -> str:
    """Most frequent answer after VQA normalisation; ties go to the earliest; returns the raw text."""
    if not answers:
        return ""
    keys = [vqa_normalize(a) for a in answers]
    counts = Counter(keys)
    best = max(counts.values())
    for raw, key in zip(answers, keys):
        if counts[key] == best:
            return raw
    return answers[0]  # pragma: no cover


def _load_vqa_style(
    dataset: str,
    root: Any,
    split: str,
    questions_name: str,
    annotations_name: str,
    limit: int | None,
    seed: int | None,
    suffix: str | None,
) -> list[Sample]:
    image_split = _coco_image_split(split)
    layout = f"root/{questions_name}, root/{annotations_name} plus images in root/{image_split}/"
    base = _check_root(root, dataset, layout)
    q_path = base / questions_name
    a_path = base / annotations_name
    questions = _json_list(_read_json(q_path, dataset, "question file"), "questions", q_path, dataset)

    annotations: dict[int, dict] | None
    if not a_path.is_file() and split.startswith("test"):
        annotations = None  # test splits ship without answers
    else:
        raw = _json_list(_read_json(a_path, dataset, "annotation file"), "annotations", a_path, dataset)
        annotations = {}
        for i, ann in enumerate(raw):
            annotations[_field(ann, "question_id", a_path, i, dataset, int)] = ann
            answers = _field(ann, "answers", a_path, i, dataset, list)
            for j, ans in enumerate(answers):
                if not isinstance(ans, dict) or not isinstance(ans.get("answer"), str):
                    raise DatasetError(
                        f"{dataset}: annotation #{i} of {str(a_path)!r}: answer #{j} lacks a string "
                        f"'answer' field: {ans!r:.100}"
                    )

    records: list[tuple[dict, dict | None]] = []
    for i, q in enumerate(questions):
        qid = _field(q, "question_id", q_path, i, dataset, int)
        _field(q, "image_id", q_path, i, dataset, int)
        _field(q, "question", q_path, i, dataset, str)
        ann = None
        if annotations is not None:
            ann = annotations.get(qid)
            if ann is None:
                raise DatasetError(
                    f"{dataset}: question {qid} (entry #{i} of {str(q_path)!r}) has no annotation in "
                    f"{str(a_path)!r}"
                )
        records.append((q, ann))

    chosen = _select(records, limit, seed)

    def file_name(image_id: int) -> str:
        return f"COCO_{image_split}_{image_id:012d}.jpg"

    folder = _find_image_dir(
        [base / image_split, base / "images" / image_split, base / "images", base],
        file_name(chosen[0][0]["image_id"]) if chosen else None,
        dataset,
    )
    samples = []
    for q, ann in chosen:
        question = _clean_text(q["question"])
        prompt = question if suffix is None else f"{question}\n{suffix}"
        meta: dict[str, Any] = {
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "question_type": None,
            "answer_type": None,
        }
        if ann is None:
            answer, references = "", ()
        else:
            references = tuple(_clean_text(a["answer"]) for a in ann["answers"])
            mc = ann.get("multiple_choice_answer")
            answer = _clean_text(mc) if isinstance(mc, str) else _majority_answer(references)
            meta["question_type"] = ann.get("question_type")
            meta["answer_type"] = ann.get("answer_type")
        samples.append(
            Sample(
                image=str(folder / file_name(q["image_id"])),
                prompt=prompt,
                answer=answer,
                references=references,
                task="vqa",
                sample_id=f"{dataset}/{split}/{q['question_id']}",
                meta=meta,
            )
        )
    return samples


def load_vqav2(
    root: str | os.PathLike,
    split: str = "val2014",
    *,
    limit: int | None = None,
    seed: int | None = 0,
    suffix: str | None = VQA_SUFFIX,
) -> list[Sample]:
    """Load VQAv2 open-ended questions as VQA samples, one per question.

    Expects ``root/v2_OpenEnded_mscoco_{split}_questions.json`` (``{"questions": [{image_id,
    question, question_id}, ...]}``), ``root/v2_mscoco_{split}_annotations.json``
    (``{"annotations": [{question_id, answers: [{answer, ...}] * 10, multiple_choice_answer,
    question_type, answer_type, ...}]}``) and the COCO images named
    ``COCO_{split}_{image_id:012d}.jpg``, searched for in ``root/{split}/``, then
    ``root/images/{split}/``, ``root/images/`` and ``root/``.  For ``test-dev2015`` the image
    names and folder use ``test2015``.

    Each sample's prompt is the question, a newline and ``suffix`` (LLaVA-1.5's short-answer
    instruction; ``suffix=None`` keeps the bare question); ``answer`` is
    ``multiple_choice_answer``; ``references`` are the annotators' answers in file order; ``meta``
    holds ``question_id``, ``image_id``, ``question_type`` and ``answer_type``.  Test splits
    (``split`` starting with ``"test"``) whose annotation file is absent give samples with
    ``answer=""``, ``references=()`` and ``None`` question/answer types; they cannot be scored.

    Args:
        root: the VQAv2 folder.
        split: ``"val2014"``, ``"train2014"``, ``"test2015"``, ``"test-dev2015"``.
        limit, seed: see the module docstring.
        suffix: the instruction appended to every question, or ``None``.

    Raises:
        DatasetError: missing root/question file/annotation file (non-test split)/image folder,
            malformed JSON, a missing field, or a question without an annotation.
    """
    return _load_vqa_style(
        "vqav2", root, split,
        f"v2_OpenEnded_mscoco_{split}_questions.json", f"v2_mscoco_{split}_annotations.json",
        limit, seed, suffix,
    )


def load_okvqa(
    root: str | os.PathLike,
    split: str = "val2014",
    *,
    limit: int | None = None,
    seed: int | None = 0,
    suffix: str | None = VQA_SUFFIX,
) -> list[Sample]:
    """Load OK-VQA as VQA samples, one per question (same schema and behaviour as :func:`load_vqav2`).

    Expects ``root/OpenEnded_mscoco_{split}_questions.json`` and
    ``root/mscoco_{split}_annotations.json`` with the VQAv2 schema, and COCO 2014 images found as
    in :func:`load_vqav2`.  OK-VQA annotations carry no ``multiple_choice_answer``; when it is
    absent the primary ``answer`` is the most frequent of the ten answers after
    :func:`vqa_normalize` (ties go to the earliest), returned in its original spelling.
    ``sample_id`` is ``"okvqa/{split}/{question_id}"``.

    Raises:
        DatasetError: as :func:`load_vqav2`.
    """
    return _load_vqa_style(
        "okvqa", root, split,
        f"OpenEnded_mscoco_{split}_questions.json", f"mscoco_{split}_annotations.json",
        limit, seed, suffix,
    )


# --------------------------------------------------------------------------------------------------
# Flickr8k

_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
_FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")


def _read_lines(path: Path, dataset: str, what: str) -> list[str]:
    _require_file(path, dataset, what)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{dataset}: {what} {str(path)!r} is not UTF-8 text: {exc}") from exc


def load_flickr8k(
    root: str | os.PathLike,
    split: str = "test",
    *,
    limit: int | None = None,
    seed: int | None = 0,
    prompt: str = CAPTION_PROMPT,
) -> list[Sample]:
    """Load Flickr8k as one captioning sample per image.

    Expects ``root/Flickr8k.token.txt`` (lines ``<image>.jpg#<k><TAB><caption>``), the split lists
    ``root/Flickr_8k.{trainImages,devImages,testImages}.txt`` (one image name per line) and the
    pictures in ``root/Flicker8k_Dataset/`` (the official spelling), ``root/Flickr8k_Dataset/`` or
    ``root/Images/``.  Samples follow the split list's order; ``split="all"`` takes every image of
    the token file in order of first appearance (note that the official token file also lists a
    few names such as ``2258277193_586949ec62.jpg.1`` that have no image file).  ``answer`` is
    caption ``#0`` and ``references`` all captions ordered by ``k`` (whitespace collapsed, the
    dataset's tokenised punctuation kept).  ``sample_id`` is ``"flickr8k/{split}/{image stem}"``
    and ``meta`` holds ``image_name``.

    Args:
        root: the Flickr8k folder.
        split: ``"train"``, ``"dev"`` (alias ``"val"``), ``"test"`` or ``"all"``.
        limit, seed: see the module docstring.
        prompt: the instruction stored in every sample.

    Raises:
        DatasetError: unknown split, missing root/token file/split list/image folder, a malformed
            token line, or a split image without captions.
    """
    dataset = "flickr8k"
    if split != "all" and split not in _FLICKR_SPLIT_FILES:
        raise DatasetError(
            f"{dataset}: unknown split {split!r}; expected one of {sorted([*_FLICKR_SPLIT_FILES, 'all'])}"
        )
    layout = "root/Flickr8k.token.txt, root/Flickr_8k.<split>Images.txt plus images in root/Flicker8k_Dataset/"
    base = _check_root(root, dataset, layout)
    token_path = base / "Flickr8k.token.txt"
    captions: dict[str, list[tuple[int, str]]] = {}
    for lineno, line in enumerate(_read_lines(token_path, dataset, "caption token file"), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, index = key.strip().rpartition("#")
        if not tab or not hash_ or not name or not index.isdigit():
            raise DatasetError(
                f"{dataset}: line {lineno} of {str(token_path)!r} is not '<image>#<k><TAB><caption>': {line!r:.120}"
            )
        captions.setdefault(name, []).append((int(index), _clean_text(caption)))

    if split == "all":
        names = list(captions)
    else:
        split_path = base / _FLICKR_SPLIT_FILES[split]
        names = [ln.strip() for ln in _read_lines(split_path, dataset, f"{split} split list") if ln.strip()]
        for name in names:
            if name not in captions:
                raise DatasetError(
                    f"{dataset}: image {name!r} listed in {str(split_path)!r} has no caption in {str(token_path)!r}"
                )
        names = list(dict.fromkeys(names))  # drop repeated names, keep first occurrence

    chosen = _select(names, limit, seed)
    folder = _find_image_dir([base / d for d in _FLICKR_IMAGE_DIRS], chosen[0] if chosen else None, dataset)
    samples = []
    for name in chosen:
        caps = [c for _, c in sorted(captions[name], key=lambda kc: kc[0])]
        samples.append(
            Sample(
                image=str(folder / name),
                prompt=prompt,
                answer=caps[0],
                references=tuple(caps),
                task="caption",
                sample_id=f"{dataset}/{split}/{Path(name).stem}",
                meta={"image_name": name},
            )
        )
    return samples


# --------------------------------------------------------------------------------------------------
# dispatch

#: Loader per dataset name accepted by :func:`load_dataset_folder`.
DATASET_LOADERS: dict[str, Callable[..., list[Sample]]] = {
    "coco": load_coco_captions,
    "vqav2": load_vqav2,
    "okvqa": load_okvqa,
    "flickr8k": load_flickr8k,
}


def load_dataset_folder(name: str, root: str | os.PathLike, **kw: Any) -> list[Sample]:
    """Load a dataset by name from a local folder, forwarding ``kw`` to its loader.

    ``name`` is one of ``"coco"``, ``"vqav2"``, ``"okvqa"``, ``"flickr8k"`` (case, ``-`` and ``_``
    are ignored, so ``"OK-VQA"`` works).  Example:
    ``load_dataset_folder("vqav2", "/data/vqav2", split="val2014", limit=256)``.

    Raises:
        DatasetError: unknown name (the message lists the known ones), or whatever the loader raises.
    """
    key = name.lower().replace("-", "").replace("_", "").strip() if isinstance(name, str) else None
    if key not in DATASET_LOADERS:
        raise DatasetError(f"unknown dataset name {name!r}; expected one of {sorted(DATASET_LOADERS)}")
    return DATASET_LOADERS[key](root, **kw)
