"""What every dataset reformatter shares: input rows, the row -> samples step, image loading.

A dataset module only has to list its input rows (each accepted with a label and split, or
rejected with a named reason) and turn an accepted row into QA pairs. Keys, sample records,
duplicate detection, image loading and status rows are done here, once, for all datasets.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import ClassVar, Generic, TypeVar

from PIL import Image, UnidentifiedImageError

from facemllm.reformatters.config import QAConfig
from facemllm.reformatters.qa import QABuilder, QAPair
from facemllm.schemas import QAImageSample, QASample, ReformatStatus, SourceDataset, Turn
from facemllm.schemas.qa import IMAGE_TOKEN, ReformatOutcome

LabelT = TypeVar("LabelT")


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: ReformatOutcome
    detail: str


@dataclass(frozen=True, slots=True)
class InputRow(Generic[LabelT]):
    """One input of a dataset: a label-file line or an image file, accepted or rejected."""

    row: int
    source: str
    image: str | None = None  # relative to the reformatter's image_base
    split: str | None = None
    label: LabelT | None = None
    rejection: Rejection | None = None


class RowRejected(Exception):
    """An accepted row whose image cannot be used; becomes a status row, never a crash."""

    def __init__(self, reason: ReformatOutcome, detail: str):
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


@dataclass(frozen=True, slots=True)
class RowResult:
    status: ReformatStatus
    samples: list[QAImageSample]  # one per split the row has questions in
    image: bytes | None  # the JPEG every sample of the row carries


ImageLoad = Callable[[Path], bytes]


class ImageLoader:
    """Source image -> JPEG bytes: JPEGs pass through byte for byte, other formats are re-encoded.

    The header is read first so an oversized image (a decompression bomb) is refused before it is
    decoded; every image is then decoded so truncated files are caught here, not by a trainer.
    """

    def __init__(self, max_pixels: int, jpeg_quality: int):
        self.max_pixels = max_pixels
        self.jpeg_quality = jpeg_quality

    def __call__(self, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RowRejected("missing_image", f"no such file: {path.name}") from None
        except OSError as err:
            raise RowRejected("unreadable_image", f"{type(err).__name__}: {err}") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > self.max_pixels:
                    raise RowRejected(
                        "unreadable_image", f"{image.width}x{image.height} exceeds max_image_pixels"
                    )
                if image.format == "JPEG":
                    # decoding at 1/8 scale still reads every byte (a truncated file fails) at a
                    # third of the cost; the pixels are not used, the bytes pass through
                    image.draft(image.mode, (image.width // 8, image.height // 8))
                    image.load()
                    return data
                encoded = io.BytesIO()
                image.convert("RGB").save(encoded, "JPEG", quality=self.jpeg_quality)
                return encoded.getvalue()
        except RowRejected:
            raise
        except UnidentifiedImageError:  # its message holds a memory address: keep status rows reproducible
            raise RowRejected("unreadable_image", "not an image format Pillow reads") from None
        except Exception as err:  # PIL raises many types for garbage input
            raise RowRejected("unreadable_image", f"{type(err).__name__}: {err}") from None


def safe_relative(name: str) -> bool:
    """A label file names an image inside the dataset, never an absolute path or one with ``..``."""
    path = PurePosixPath(name)
    return bool(name) and "\\" not in name and not path.is_absolute() and ".." not in path.parts


class DatasetReformatter(ABC, Generic[LabelT]):
    """Native files of one dataset -> QA samples (plain Python: Beam only calls it)."""

    dataset: ClassVar[SourceDataset]

    def __init__(self, root: Path, config: QAConfig):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} is not a folder")
        self.config = config
        self.builder = QABuilder(config, self.dataset)
        self.image_base = self.root

    @abstractmethod
    def list_rows(self) -> list[InputRow[LabelT]]:
        """Every input, in a stable order, rejected ones included (each with its reason)."""

    @abstractmethod
    def qa_pairs(self, row: InputRow[LabelT]) -> list[tuple[str, QAPair]]:
        """``(split, pair)`` for every question about an accepted row."""

    @cached_property
    def rows(self) -> list[InputRow[LabelT]]:
        """``list_rows`` with repeated images rejected: each image yields its samples once."""
        seen: dict[str, int] = {}
        rows = []
        for row in self.list_rows():
            if row.rejection is None and row.image in seen:
                row = replace(row, rejection=Rejection("duplicate", f"same image as row {seen[row.image]}"))
            elif row.rejection is None:
                seen[row.image] = row.row
            rows.append(row)
        return rows

    def listing_digest(self, rows: list[InputRow[LabelT]] | None = None) -> str:
        """Changes whenever an input row, its label or split, or its image file (size, modification
        time: a repaired image counts) changes; of ``rows``, default all. Guards reuse of output."""
        digest = hashlib.sha256()
        for row in self.rows if rows is None else rows:
            digest.update(repr(row).encode())
            if row.image is not None:
                try:
                    stat = (self.image_base / row.image).stat()
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
                except (OSError, ValueError):  # ValueError: a NUL in a name read from a label file
                    digest.update(b"unreadable")
        return digest.hexdigest()[:16]

    def samples(self, row: InputRow[LabelT]) -> list[QAImageSample]:
        """The row's questions as one sample per split (the image stored once).

        The turns are in a seeded random order: in a fixed one (open questions first) a model
        trained on the conversations would learn that the first question after the image is open,
        and answer every question that way when it is asked alone, as evaluation asks it."""
        by_split: dict[str, list[QASample]] = {}
        for question in self.question_samples(row):
            by_split.setdefault(question.split, []).append(question)
        samples = []
        for split, questions in by_split.items():
            self.builder.rng(row.image, f"turn_order/{split}").shuffle(questions)
            samples.append(QAImageSample.group(questions[0].key.rsplit("_", 1)[0], questions))
        return samples

    def question_samples(self, row: InputRow[LabelT]) -> list[QASample]:
        """The row's questions; keys ``{dataset}_{split}_{row:08d}_{index:02d}`` grow with the row."""
        return [
            QASample(
                key=f"{self.dataset}_{split}_{row.row:08d}_{index:02d}",
                image=row.image,
                dataset=self.dataset,
                split=split,
                task=pair.task,
                answer_style=pair.answer_style,
                template_id=pair.template_id,
                conversations=[
                    Turn(speaker="human", value=f"{IMAGE_TOKEN}\n{pair.question}"),
                    Turn(speaker="gpt", value=pair.answer),
                ],
                label=pair.label,
            )
            for index, (split, pair) in enumerate(self.qa_pairs(row))
        ]

    def reformat_row(self, row: InputRow[LabelT], load_image: ImageLoad) -> RowResult:
        fields = {
            "dataset": self.dataset,
            "row": row.row,
            "source": row.source,
            "image": row.image,
            "split": row.split,
        }
        rejection = row.rejection
        if rejection is None:
            try:
                image = load_image(self.image_base / row.image)
            except RowRejected as err:
                rejection = err.rejection
        if rejection is not None:
            return RowResult(
                ReformatStatus(**fields, status=rejection.reason, error=rejection.detail), [], None
            )
        samples = self.samples(row)
        questions = sum(len(sample.questions) for sample in samples)
        return RowResult(ReformatStatus(**fields, status="ok", samples=questions), samples, image)
