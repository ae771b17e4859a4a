"""RAF-DB (basic): ``EmoLabel/list_patition_label.txt`` (sic) + ``Image/aligned`` or ``Image/original``.

Each line is ``train_00001.jpg 5``; the split is the name's prefix (``train_``, ``test_``) and the
label one of the 7 basic expressions (1 Surprise ... 7 Neutral). The 100x100 aligned crops
(``Image/aligned/train_00001_aligned.jpg``) are used when that folder exists, else the originals.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from facemllm.reformatters.base import DatasetReformatter, InputRow, Rejection, safe_relative
from facemllm.reformatters.config import QAConfig
from facemllm.reformatters.qa import Category, LabelSpace, QAPair
from facemllm.schemas.vocab import RAFDB_EXPRESSION_IDS

LABEL_FILES = ("EmoLabel/list_patition_label.txt", "EmoLabel/list_partition_label.txt")
SPLIT_PREFIXES = {"train_": "train", "test_": "test"}
EXPRESSIONS = LabelSpace(
    Category(
        expression, expression.capitalize(), "a neutral expression" if expression == "neutral" else expression
    )
    for expression in RAFDB_EXPRESSION_IDS.values()
)


class RAFDBReformatter(DatasetReformatter[str]):
    dataset = "rafdb"

    def __init__(self, root: Path, config: QAConfig):
        super().__init__(root, config)
        found = [name for name in LABEL_FILES if (self.root / name).is_file()]
        if not found:
            raise FileNotFoundError(f"RAF-DB root {self.root} holds neither of {', '.join(LABEL_FILES)}")
        self.label_file = found[0]
        self.aligned = (self.root / "Image" / "aligned").is_dir()

    def image_path(self, name: str) -> str:
        if self.aligned:
            return f"Image/aligned/{PurePosixPath(name).stem}_aligned.jpg"
        return f"Image/original/{name}"

    def list_rows(self) -> list[InputRow[str]]:
        rows = []
        lines = (self.root / self.label_file).read_text("utf-8-sig", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if line.strip():
                rows.append(self._parse(len(rows), f"{self.label_file}:{number}", line.split()))
        return rows

    def _parse(self, index: int, source: str, fields: list[str]) -> InputRow[str]:
        if len(fields) != 2:
            return InputRow(
                index, source, rejection=Rejection("wrong_column_count", f"{len(fields)} fields, not 2")
            )
        name, code = fields
        if not safe_relative(name) or "/" in name:
            return InputRow(
                index, source, rejection=Rejection("bad_name", f"{name!r} is not a plain file name")
            )
        image = self.image_path(name)
        split = next((s for prefix, s in SPLIT_PREFIXES.items() if name.startswith(prefix)), None)
        if code not in RAFDB_EXPRESSION_IDS:
            return InputRow(
                index, source, image, split, rejection=Rejection("unknown_label", f"label {code!r}")
            )
        if split is None:
            return InputRow(
                index,
                source,
                image,
                rejection=Rejection("no_split", f"{name} starts with neither train_ nor test_"),
            )
        return InputRow(index, source, image, split, RAFDB_EXPRESSION_IDS[code])

    def qa_pairs(self, row: InputRow[str]) -> list[tuple[str, QAPair]]:
        return [
            (row.split, pair)
            for pair in self.builder.categorical(row.image, "expression", row.label, EXPRESSIONS)
        ]
