"""CelebA, RAF-DB, UTKFace and FairFace in their native layouts, built from real face photos.

Each builder writes the dataset's exact label-file formats (REFERENCE.md) with a few malformed
entries mixed in, and returns what a correct reformatter must find: the label and split of every
accepted image and the status of every input row. The demo recipe reformats them; the tests check
the reformatters against the truth they return.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from facemllm.pipeline.demo.sample import package_photos
from facemllm.reformatters.celeba_attributes import CELEBA_ATTRIBUTES

ATTRIBUTE_NAMES = list(CELEBA_ATTRIBUTES)
FACE_PHOTOS = ("astronaut.png", "camera.png", "t1.jpg", "Tom_Hanks_54745.png")


def face_photos() -> list[Path]:
    """Real face photos shipped by installed packages (scikit-image's, where it is installed, and
    insightface's)."""
    photos = package_photos()
    found = [photos[name] for name in FACE_PHOTOS if name in photos]
    if not found:
        raise FileNotFoundError(f"none of {FACE_PHOTOS} is installed (insightface ships two of them)")
    return found


def photo_jpeg(index: int, size: tuple[int, int]) -> bytes:
    """The ``index``-th photo (cycling), resized to ``size``, as JPEG bytes."""
    photos = face_photos()
    with Image.open(photos[index % len(photos)]) as image:
        resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    encoded = io.BytesIO()
    resized.save(encoded, "JPEG", quality=90)
    return encoded.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


@dataclass
class NativeDataset:
    """A built dataset: ``root`` for ``--root``, and the truth a reformatter must reproduce."""

    root: Path
    labels: dict[str, object] = field(default_factory=dict)  # image (as QASample.image) -> label
    splits: dict[str, str] = field(default_factory=dict)  # image -> split
    statuses: list[str] = field(default_factory=list)  # status of every input row, in row order


def celeba_attr_line(name: str, values: list[int]) -> str:
    """CelebA's own format: values right-aligned in two characters, so 1 follows two spaces."""
    return f"{name} " + " ".join(f"{value:2d}" for value in values)


def build_celeba(root: Path, layout: str = "official") -> NativeDataset:
    """14 attribute rows: 9 good (5 train, 2 val, 2 test) and one of each malformation, plus a repeat."""
    folders = {
        "official": ("Anno", "Eval", "Img"),
        "torchvision": ("celeba", "celeba", "celeba"),
    }[layout]
    anno, evaluation, img = (root / folder for folder in folders)
    rng = random.Random(7)
    truth = NativeDataset(root)
    lines, partition_lines = [], []
    for number in range(1, 15):
        name = f"{number:06d}.jpg"
        values = [1 if rng.random() < 0.35 else -1 for _ in ATTRIBUTE_NAMES]
        split = "train" if number <= 5 else "val" if number <= 7 else "test"
        status = "ok"
        line = celeba_attr_line(name, values)
        if number == 10:
            line, status = celeba_attr_line(name, values[:-1]), "wrong_column_count"
        elif number == 11:
            line, status = line.replace("-1", " 0", 1), "unknown_label"
        elif number == 12:
            status = "missing_image"
        elif number == 13:
            status = "no_split"
        elif number == 14:
            status = "unreadable_image"
        lines.append(line)
        truth.statuses.append(status)
        if number != 13:
            partition_lines.append(f"{name} {'012'[['train', 'val', 'test'].index(split)]}")
        if number == 14:
            write(img / "img_align_celeba" / name, b"this is not a JPEG")
        elif number != 12:
            write(img / "img_align_celeba" / name, photo_jpeg(number, (178, 218)))
        if status == "ok":
            image = f"img_align_celeba/{name}"
            truth.labels[image] = {a: v == 1 for a, v in zip(ATTRIBUTE_NAMES, values, strict=True)}
            truth.splits[image] = split
    lines.append(lines[2])  # 000003.jpg again
    truth.statuses.append("duplicate")
    partition_lines.append("000015.jpg")  # malformed partition line: ignored
    header = f"{len(lines)}\n{' '.join(ATTRIBUTE_NAMES)} \n"
    write(anno / "list_attr_celeba.txt", header + "\n".join(lines) + "\n")
    write(evaluation / "list_eval_partition.txt", "\n".join(partition_lines) + "\n")
    return truth


RAFDB_CODES = "1234567"


def build_rafdb(root: Path) -> NativeDataset:
    """6 train and 3 test images (aligned and original) plus four malformed lines."""
    truth = NativeDataset(root)
    entries = [(f"train_{n:05d}.jpg", RAFDB_CODES[n % 7], "ok") for n in range(1, 7)]
    entries += [(f"test_{n:04d}.jpg", RAFDB_CODES[(n + 3) % 7], "ok") for n in range(1, 4)]
    entries += [
        ("train_00007.jpg", "8", "unknown_label"),
        ("train_00008.jpg", None, "wrong_column_count"),
        ("train_00009.jpg", "4", "missing_image"),
        ("val_0001.jpg", "3", "no_split"),
    ]
    lines = []
    for index, (name, code, status) in enumerate(entries):
        lines.append(name if code is None else f"{name} {code}")
        truth.statuses.append(status)
        stem = name.removesuffix(".jpg")
        if status != "missing_image":
            write(root / "Image" / "aligned" / f"{stem}_aligned.jpg", photo_jpeg(index, (100, 100)))
            write(root / "Image" / "original" / name, photo_jpeg(index, (320, 240)))
        if status == "ok":
            image = f"Image/aligned/{stem}_aligned.jpg"
            truth.labels[image] = code
            truth.splits[image] = name.split("_")[0]
    write(root / "EmoLabel" / "list_patition_label.txt", "\n".join(lines) + "\n")
    return truth


UTKFACE_GOOD = [  # age, gender, race: two groups of ten (8 train, 1 val, 1 test each), five loners
    *[(20 + i, 0, 0) for i in range(10)],
    *[(30 + i, 1, 2) for i in range(10)],
    (1, 1, 4),
    (8, 0, 1),
    (67, 1, 3),
    (85, 0, 2),
    (116, 1, 0),
]
UTKFACE_BAD = {
    "39_1_20170116174525125.jpg.chip.jpg": "bad_name",  # race missing (a real UTKFace file)
    "24_0_1_20170116220224657 .jpg.chip.jpg": "bad_name",  # space before the extension
    "55_0_0_20170116232725357jpg.chip.jpg": "bad_name",  # missing dot
    "130_0_0_20170116232725357.jpg.chip.jpg": "unknown_label",  # age above 116
    "20_2_0_20170116232725357.jpg.chip.jpg": "unknown_label",  # gender code 2
}


def build_utkface(
    root: Path, suffix: str = ".jpg.chip.jpg", size: tuple[int, int] = (200, 200)
) -> NativeDataset:
    """The aligned-cropped set (``.jpg.chip.jpg``, 200x200) or in the wild (``suffix=".jpg"``)."""
    truth = NativeDataset(root)
    names = {}
    for index, (age, gender, race) in enumerate(UTKFACE_GOOD):
        name = f"{age}_{gender}_{race}_2017010912{index:07d}{suffix}"
        names[name] = "ok"
        truth.labels[name] = (age, gender, race)
        write(root / name, photo_jpeg(index, size))
    for name, status in UTKFACE_BAD.items():
        names[name] = status
        write(root / name, photo_jpeg(0, size))
    truth.statuses = [names[name] for name in sorted(names)]
    return truth


FAIRFACE_HEADER = "file,age,gender,race,service_test"


def build_fairface(root: Path) -> NativeDataset:
    """Train: 6 good rows and four malformed ones; val: 3 rows under a header without service_test."""
    truth = NativeDataset(root)
    good_train = [
        ("train/1.jpg", "10-19", "Male", "White"),
        ("train/2.jpg", "more than 70", "Female", "East Asian"),
        ("train/3.jpg", "0-2", "Female", "Latino_Hispanic"),
        ("train/4.jpg", "30-39", "Male", "Middle Eastern"),
        ("train/5.jpg", "50-59", "Female", "Southeast Asian"),
        ("train/10.jpg", "20-29", "Male", "Black"),
    ]
    rows = [",".join([*fields, "True"]) for fields in good_train]
    truth.statuses += ["ok"] * len(good_train)
    rows += [
        "train/6.jpg,20-29,Male",  # wrong column count
        "train/7.jpg,20-29,Male,Other,False",  # race outside FairFace's seven
        "train/99.jpg,40-49,Female,Indian,False",  # no such image
        "../secret.jpg,40-49,Female,Indian,False",  # path leaving the dataset
    ]
    truth.statuses += ["wrong_column_count", "unknown_label", "missing_image", "bad_name"]
    write(root / "fairface_label_train.csv", "\n".join([FAIRFACE_HEADER, *rows]) + "\n")
    good_val = [("val/1.jpg", "3-9", "Male", "Indian"), ("val/2.jpg", "60-69", "Female", "White")]
    good_val.append(("val/3.jpg", "40-49", "Male", "Black"))
    write(
        root / "fairface_label_val.csv",
        "\n".join(["file,age,gender,race", *(",".join(fields) for fields in good_val)]) + "\n",
    )
    truth.statuses += ["ok"] * len(good_val)
    for index, (image, *labels) in enumerate(good_train + good_val + [("train/6.jpg",), ("train/7.jpg",)]):
        write(root / image, photo_jpeg(index, (224, 224)))
        if labels:
            truth.labels[image] = tuple(labels)
            truth.splits[image] = image.split("/")[0]
    return truth
