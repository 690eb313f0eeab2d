"""Local-folder loaders for COCO captions, VQAv2, OK-VQA, Flickr8k, and the VQA answer metric.

Every test writes its own miniature dataset (a few 8x8 images and annotation files in the official
formats) under ``tmp_path``; nothing is downloaded and no model is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cleansight_analysis.data import CAPTION_PROMPT, VQA_SUFFIX, Sample
from cleansight_analysis.data.real import (
    DATASET_LOADERS,
    load_coco_captions,
    load_dataset_folder,
    load_flickr8k,
    load_okvqa,
    load_vqav2,
    vqa_normalize,
    vqa_score,
)
from cleansight_analysis.errors import CleanSightError, DatasetError, InputError


def _image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (8, 8), (shade % 256, 40, 90)).save(path, format=fmt)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# fixture builders (official on-disk formats)

COCO_IDS = [139, 285, 632, 724, 776, 785, 802, 872, 885, 1000, 1268, 1296]


def make_coco(root: Path, split: str = "val2017", image_dir: str | None = None, ids=COCO_IDS) -> Path:
    """COCO 2017 layout; captions are interleaved across images (as in the real file)."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 8, "width": 8} for i in ids]
    annotations = []
    ann_id = 1
    for k in range(5):
        for i in ids:
            caption = f"  Image {i}   caption {k}. \n" if k == 0 else f"image {i} caption {k}"
            annotations.append({"image_id": i, "id": ann_id, "caption": caption})
            ann_id += 1
    _dump(root / "annotations" / f"captions_{split}.json",
          {"info": {}, "licenses": [], "images": images, "annotations": annotations})
    folder = root / (image_dir if image_dir is not None else split)
    for n, i in enumerate(ids):
        _image(folder / f"{i:012d}.jpg", n)
    return root


def _answers(words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": k + 1} for k, w in enumerate(words)]


VQA_QUESTIONS = [  # (question_id, image_id, question, 10 answers, multiple_choice_answer)
    (262148000, 262148, "Where is he looking?", ["down"] * 7 + ["at table", "skateboard", "table"], "down"),
    (262148001, 262148, "What are the people   in the background doing?",
     ["watching"] * 5 + ["spectating"] * 3 + ["people watching", "watching skateboarder"], "watching"),
    (393225000, 393225, "How many dogs?", ["2"] * 9 + ["two"], "2"),
    (393225001, 393225, "Is the bowl empty?", ["no"] * 10, "no"),
    (393226000, 393226, "What color is the cat?", ["black"] * 4 + ["gray"] * 6, "gray"),
    (393227000, 393227, "Which room is this?", ["kitchen"] * 10, "kitchen"),
]


def make_vqa(root: Path, kind: str = "vqav2", split: str = "val2014", image_layout: str = "split",
             with_annotations: bool = True, questions=VQA_QUESTIONS) -> Path:
    """VQAv2 / OK-VQA layout. ``image_layout`` in {"split", "images_split", "images", "root", "none"}."""
    qname = f"v2_OpenEnded_mscoco_{split}_questions.json" if kind == "vqav2" else f"OpenEnded_mscoco_{split}_questions.json"
    aname = f"v2_mscoco_{split}_annotations.json" if kind == "vqav2" else f"mscoco_{split}_annotations.json"
    _dump(root / qname, {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
                         "questions": [{"image_id": im, "question": q, "question_id": qid}
                                       for qid, im, q, _, _ in questions]})
    if with_annotations:
        anns = []
        for qid, im, _, words, mc in reversed(questions):  # annotation order differs from question order
            ann = {"question_id": qid, "image_id": im, "answers": _answers(words),
                   "question_type": "what is", "answer_type": "other"}
            if kind == "vqav2":
                ann["multiple_choice_answer"] = mc
            anns.append(ann)
        _dump(root / aname, {"info": {}, "annotations": anns})
    image_split = "test2015" if split.startswith("test") else split
    folder = {"split": root / image_split, "images_split": root / "images" / image_split,
              "images": root / "images", "root": root, "none": None}[image_layout]
    if folder is not None:
        for n, im in enumerate(sorted({im for _, im, _, _, _ in questions})):
            _image(folder / f"COCO_{image_split}_{im:012d}.jpg", n)
    return root


FLICKR_NAMES = [f"{1000268201 + 17 * i}_{i:04x}b08cb0e.jpg" for i in range(10)]
FLICKR_SPLITS = {"train": FLICKR_NAMES[:5], "dev": FLICKR_NAMES[5:7], "test": FLICKR_NAMES[7:]}


def make_flickr(root: Path, image_dir: str = "Flicker8k_Dataset") -> Path:
    """Flickr8k layout; the last image's captions are written out of ``#k`` order."""
    lines = []
    for name in FLICKR_NAMES:
        ks = [4, 2, 0, 3, 1] if name == FLICKR_NAMES[-1] else range(5)
        lines += [f"{name}#{k}\tA  dog number {k} runs on {name[:4]} ." for k in ks]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, names in FLICKR_SPLITS.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    for n, name in enumerate(FLICKR_NAMES):
        _image(root / image_dir / name, n)
    return root


# --------------------------------------------------------------------------------------------------
# COCO captions


def test_coco_captions_basic(tmp_path):
    root = make_coco(tmp_path / "coco")
    samples = load_coco_captions(root)
    assert len(samples) == len(COCO_IDS)
    assert all(isinstance(s, Sample) for s in samples)
    assert [s.sample_id for s in samples] == [f"coco/val2017/{i}" for i in COCO_IDS]
    s = samples[0]
    assert s.task == "caption" and s.prompt == CAPTION_PROMPT
    assert s.answer == "Image 139 caption 0."  # stripped, whitespace collapsed
    assert s.references == ("Image 139 caption 0.",) + tuple(f"image 139 caption {k}" for k in range(1, 5))
    assert s.meta["image_id"] == 139
    assert isinstance(s.image, str) and s.image == str(root / "val2017" / "000000000139.jpg")
    assert all(os.path.isfile(x.image) for x in samples)
    assert load_coco_captions(root, prompt="Caption it.")[3].prompt == "Caption it."


def test_coco_alternative_image_folder(tmp_path):
    root = make_coco(tmp_path / "coco", image_dir="images/val2017")
    samples = load_coco_captions(root, limit=2, seed=None)
    assert samples[0].image == str(root / "images" / "val2017" / "000000000139.jpg")
    assert all(os.path.isfile(x.image) for x in samples)


def test_limit_and_seed(tmp_path):
    root = make_coco(tmp_path / "coco")
    everything = [s.sample_id for s in load_coco_captions(root)]
    first = [s.sample_id for s in load_coco_captions(root, limit=4, seed=None)]
    assert first == everything[:4]
    a = [s.sample_id for s in load_coco_captions(root, limit=4, seed=0)]
    b = [s.sample_id for s in load_coco_captions(root, limit=4, seed=0)]
    c = [s.sample_id for s in load_coco_captions(root, limit=4, seed=1)]
    assert a == b and len(a) == 4 and len(set(a)) == 4
    assert a != c
    assert a == [x for x in everything if x in a]  # kept in file order
    assert load_coco_captions(root, limit=0) == []
    assert len(load_coco_captions(root, limit=100, seed=3)) == len(COCO_IDS)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(DatasetError, match="limit"):
            load_coco_captions(root, limit=bad)


def test_coco_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_coco_captions(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"captions_val2017\.json"):
        load_coco_captions(tmp_path / "empty")

    root = make_coco(tmp_path / "c1")
    with pytest.raises(DatasetError, match=r"captions_train2017\.json"):
        load_coco_captions(root, split="train2017")
    (root / "annotations" / "captions_val2017.json").write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco_captions(root)
    _dump(root / "annotations" / "captions_val2017.json", {"images": []})
    with pytest.raises(DatasetError, match="'annotations'"):
        load_coco_captions(root)

    root = make_coco(tmp_path / "c2", image_dir="somewhere_else")
    with pytest.raises(DatasetError, match="image folder") as info:
        load_coco_captions(root)
    assert str(root / "val2017") in str(info.value) and str(root / "images") in str(info.value)

    root = make_coco(tmp_path / "c3")
    data = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    data["images"].append({"id": 4242, "file_name": "000000004242.jpg"})
    _dump(root / "annotations" / "captions_val2017.json", data)
    with pytest.raises(DatasetError, match="4242.*no caption"):
        load_coco_captions(root)
    data["images"].pop()
    data["annotations"].append({"image_id": 999, "id": 5, "caption": "orphan"})
    _dump(root / "annotations" / "captions_val2017.json", data)
    with pytest.raises(DatasetError, match="999"):
        load_coco_captions(root)
    data["annotations"].pop()
    del data["images"][0]["file_name"]
    _dump(root / "annotations" / "captions_val2017.json", data)
    with pytest.raises(DatasetError, match="file_name"):
        load_coco_captions(root)


# --------------------------------------------------------------------------------------------------
# VQAv2 / OK-VQA


@pytest.mark.parametrize("layout", ["split", "images_split", "images", "root"])
def test_vqav2_basic(tmp_path, layout):
    root = make_vqa(tmp_path / "vqa", image_layout=layout)
    samples = load_vqav2(root)
    assert len(samples) == len(VQA_QUESTIONS)
    assert [s.sample_id for s in samples] == [f"vqav2/val2014/{q[0]}" for q in VQA_QUESTIONS]
    s = samples[1]
    assert s.task == "vqa"
    assert s.prompt == "What are the people in the background doing?\n" + VQA_SUFFIX
    assert s.answer == "watching"
    assert s.references == tuple(VQA_QUESTIONS[1][3]) and len(s.references) == 10
    assert s.meta == {"question_id": 262148001, "image_id": 262148,
                      "question_type": "what is", "answer_type": "other"}
    assert samples[4].answer == "gray"  # multiple_choice_answer, not recomputed
    assert Path(s.image).name == "COCO_val2014_000000262148.jpg"
    assert all(os.path.isfile(x.image) for x in samples)


def test_vqav2_suffix_and_subsets(tmp_path):
    root = make_vqa(tmp_path / "vqa")
    bare = load_vqav2(root, suffix=None)
    assert bare[0].prompt == "Where is he looking?"
    assert load_vqav2(root, suffix="Short answer.")[0].prompt == "Where is he looking?\nShort answer."
    ids = [s.sample_id for s in load_vqav2(root, limit=3, seed=7)]
    assert ids == [s.sample_id for s in load_vqav2(root, limit=3, seed=7)]
    assert [s.sample_id for s in load_vqav2(root, limit=2, seed=None)] == [s.sample_id for s in bare[:2]]


def test_vqav2_test_split_without_annotations(tmp_path):
    root = make_vqa(tmp_path / "vqa", split="test2015", with_annotations=False)
    samples = load_vqav2(root, split="test2015")
    assert len(samples) == len(VQA_QUESTIONS)
    assert all(s.answer == "" and s.references == () for s in samples)
    assert samples[0].sample_id == "vqav2/test2015/262148000"
    assert samples[0].meta["question_type"] is None
    root = make_vqa(tmp_path / "vqa_dev", split="test-dev2015", with_annotations=False)
    samples = load_vqav2(root, split="test-dev2015")
    assert Path(samples[0].image) == root / "test2015" / "COCO_test2015_000000262148.jpg"
    assert os.path.isfile(samples[0].image)
    with pytest.raises(InputError):
        vqa_score("yes", samples[0].references)


def test_vqav2_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_vqav2(tmp_path / "missing")
    root = make_vqa(tmp_path / "a", with_annotations=False)
    with pytest.raises(DatasetError, match=r"v2_mscoco_val2014_annotations\.json"):
        load_vqav2(root)
    with pytest.raises(DatasetError, match=r"v2_OpenEnded_mscoco_train2014_questions\.json"):
        load_vqav2(root, split="train2014")

    root = make_vqa(tmp_path / "b", questions=VQA_QUESTIONS[:3])
    # a question file that knows one more question than the annotation file
    make_vqa(tmp_path / "b", questions=VQA_QUESTIONS[:4], with_annotations=False)
    with pytest.raises(DatasetError, match="393225001.*no annotation"):
        load_vqav2(root)

    root = make_vqa(tmp_path / "c")
    (root / "v2_mscoco_val2014_annotations.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_vqav2(root)
    _dump(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"qs": []})
    with pytest.raises(DatasetError, match="'questions'"):
        load_vqav2(root)

    root = make_vqa(tmp_path / "d", image_layout="none")
    with pytest.raises(DatasetError, match="image folder") as info:
        load_vqav2(root)
    for looked in ("val2014", "images"):
        assert str(root / looked) in str(info.value)
    (root / "val2014").mkdir()  # folder exists but does not hold the images
    with pytest.raises(DatasetError, match="COCO_val2014_000000262148.jpg"):
        load_vqav2(root)


def test_okvqa(tmp_path):
    root = make_vqa(tmp_path / "ok", kind="okvqa")
    samples = load_okvqa(root)
    assert [s.sample_id for s in samples] == [f"okvqa/val2014/{q[0]}" for q in VQA_QUESTIONS]
    # no multiple_choice_answer in OK-VQA: majority after normalisation ("2" x9 + "two")
    assert samples[2].answer == "2"
    assert samples[4].answer == "gray"  # 6 x gray beats 4 x black
    assert samples[0].references[7] == "at table"
    assert samples[0].prompt.endswith("\n" + VQA_SUFFIX)
    assert all(os.path.isfile(x.image) for x in samples)
    with pytest.raises(DatasetError, match=r"mscoco_val2014_annotations\.json"):
        load_okvqa(make_vqa(tmp_path / "ok2", kind="okvqa", with_annotations=False))


# --------------------------------------------------------------------------------------------------
# Flickr8k


@pytest.mark.parametrize("image_dir", ["Flicker8k_Dataset", "Flickr8k_Dataset", "Images"])
def test_flickr8k_basic(tmp_path, image_dir):
    root = make_flickr(tmp_path / "f8k", image_dir=image_dir)
    samples = load_flickr8k(root)
    assert [s.sample_id for s in samples] == [f"flickr8k/test/{Path(n).stem}" for n in FLICKR_SPLITS["test"]]
    s = samples[-1]  # captions written out of order in the token file
    assert s.task == "caption" and s.prompt == CAPTION_PROMPT
    assert s.answer == f"A dog number 0 runs on {FLICKR_NAMES[-1][:4]} ."
    assert s.references == tuple(f"A dog number {k} runs on {FLICKR_NAMES[-1][:4]} ." for k in range(5))
    assert s.meta == {"image_name": FLICKR_NAMES[-1]}
    assert all(os.path.isfile(x.image) and Path(x.image).parent.name == image_dir for x in samples)
    assert len(load_flickr8k(root, split="train")) == 5
    assert len(load_flickr8k(root, split="dev")) == 2
    everything = load_flickr8k(root, split="all")
    assert [Path(x.image).name for x in everything] == FLICKR_NAMES
    assert everything[0].sample_id.startswith("flickr8k/all/")
    sub = [x.sample_id for x in load_flickr8k(root, split="all", limit=4, seed=5)]
    assert sub == [x.sample_id for x in load_flickr8k(root, split="all", limit=4, seed=5)]
    assert sub != [x.sample_id for x in load_flickr8k(root, split="all", limit=4, seed=6)]


def test_flickr8k_errors(tmp_path):
    root = make_flickr(tmp_path / "f8k")
    with pytest.raises(DatasetError, match="unknown split.*'test'"):
        load_flickr8k(root, split="testing")
    (root / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DatasetError, match=r"Flickr_8k\.devImages\.txt"):
        load_flickr8k(root, split="dev")
    with (root / "Flickr_8k.testImages.txt").open("a") as fh:
        fh.write("nobody.jpg\n")
    with pytest.raises(DatasetError, match="nobody.jpg.*no caption"):
        load_flickr8k(root)
    with (root / "Flickr8k.token.txt").open("a") as fh:
        fh.write("a line without a tab\n")
    with pytest.raises(DatasetError, match="line 51"):
        load_flickr8k(root)
    (root / "Flickr8k.token.txt").unlink()
    with pytest.raises(DatasetError, match=r"Flickr8k\.token\.txt"):
        load_flickr8k(root)

    root = make_flickr(tmp_path / "f8k2", image_dir="pics")
    with pytest.raises(DatasetError, match="Flicker8k_Dataset"):
        load_flickr8k(root)


# --------------------------------------------------------------------------------------------------
# dispatch and error family


def test_load_dataset_folder(tmp_path):
    coco = make_coco(tmp_path / "coco")
    vqa = make_vqa(tmp_path / "vqa")
    ok = make_vqa(tmp_path / "ok", kind="okvqa")
    f8k = make_flickr(tmp_path / "f8k")
    assert set(DATASET_LOADERS) == {"coco", "vqav2", "okvqa", "flickr8k"}
    assert load_dataset_folder("coco", coco, limit=2, seed=None)[0].sample_id == "coco/val2017/139"
    assert load_dataset_folder("vqav2", vqa, suffix=None)[0].prompt == "Where is he looking?"
    assert load_dataset_folder("OK-VQA", ok)[0].sample_id.startswith("okvqa/")
    assert len(load_dataset_folder("flickr8k", f8k, split="train")) == 5
    with pytest.raises(DatasetError, match="gqa.*coco.*flickr8k.*okvqa.*vqav2"):
        load_dataset_folder("gqa", coco)


def test_errors_are_cleansight_errors(tmp_path):
    assert issubclass(DatasetError, CleanSightError) and issubclass(DatasetError, ValueError)
    with pytest.raises(ValueError):
        load_flickr8k(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        load_okvqa(tmp_path / "file.txt")
    with pytest.raises(DatasetError, match="no dataset root"):
        load_vqav2(None)


# --------------------------------------------------------------------------------------------------
# VQA normalisation and score


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs!", "2 dogs"),
        ("a Cat", "cat"),
        ("The  cat.", "cat"),
        ("it's", "it's"),  # already written with an apostrophe: untouched
        ("its", "its"),  # an ordinary word, not in the contraction table
        ("dont", "don't"),
        ("Youre right", "you're right"),
        ("hed've", "he'd've"),
        ("wouldn'tve", "wouldn't've"),
        ("yall", "y'all"),
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("t-shirt", "t shirt"),  # punctuation with no neighbouring space becomes a space
        ("yes, it is", "yes it is"),  # ... and is deleted when it touches a space
        ("1,000", "1000"),  # digit,digit: commas deleted
        ("  red\tand\nblue ", "red and blue"),
        ("An Apple", "apple"),
    ],
)
def test_vqa_normalize(raw, expected):
    assert vqa_normalize(raw) == expected


def test_vqa_score_values():
    refs = ["2"] * 9 + ["3"]
    assert vqa_score("2", refs) == 1.0
    assert vqa_score("Two", refs) == 1.0  # normalised to "2"
    # exactly 1 of 10 matching: leaving out the matching annotator -> 0 matches -> 0 (1 subset);
    # leaving out any of the 9 others -> 1 match -> 1/3 (9 subsets).  Mean = 9 * (1/3) / 10 = 0.3.
    assert vqa_score("3", refs) == pytest.approx(0.3)
    # 2 matching: 2 subsets with 1 match (1/3) + 8 subsets with 2 matches (2/3) -> (2/3 + 16/3)/10 = 0.6
    assert vqa_score("cat", ["cat", "cat"] + ["dog"] * 8) == pytest.approx(0.6)
    # 3 matching: 3 subsets with 2 matches (2/3) + 7 subsets with 3 matches (1) -> (2 + 7)/10 = 0.9
    assert vqa_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    # 4 or more matching: every subset keeps >= 3 matches -> 1.0
    assert vqa_score("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_score("bird", ["cat"] * 4 + ["dog"] * 6) == 0.0
    assert vqa_score("The cat.", ["cat"] * 10) == 1.0
    assert vqa_score("The cat.", ["cat"] * 10, normalize=False) == 0.0
    assert vqa_score("cat", ["cat"]) == 1.0 and vqa_score("dog", ["cat"]) == 0.0
    with pytest.raises(InputError):
        vqa_score("cat", [])
    with pytest.raises(InputError):
        vqa_normalize(3)
