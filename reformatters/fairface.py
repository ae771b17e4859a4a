"""FairFace: ``fairface_label_{train,val}.csv`` + the ``train/`` and ``val/`` image folders.

The header is ``file,age,gender,race,service_test``; columns are found by name, so a reordered
header or one without ``service_test`` still parses, while a header lacking ``file``, ``age``,
``gender`` or ``race`` rejects every row of that file as ``bad_header``. The split is the label
file's (train or val). Values must be FairFace's own: age bins 0-2 ... more than 70, Male/Female,
and seven race categories.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from facemllm.reformatters.base import DatasetReformatter, InputRow, Rejection, safe_relative
from facemllm.reformatters.config import QAConfig
from facemllm.reformatters.demographics import AGE_BANDS, PerceivedDemographics, demographic_pairs
from facemllm.reformatters.qa import Category, LabelSpace, QAPair
from facemllm.schemas.vocab import FAIRFACE_GENDERS, FAIRFACE_RACES

LABEL_FILES = {"train": "fairface_label_train.csv", "val": "fairface_label_val.csv"}
REQUIRED_COLUMNS = ("file", "age", "gender", "race")
RACE_WORDS = {"Latino_Hispanic": ("Latino/Hispanic", "Latino or Hispanic")}  # option, phrase; else the value
RACES = LabelSpace(Category(race, *RACE_WORDS.get(race, (race, race))) for race in FAIRFACE_RACES)


class FairFaceReformatter(DatasetReformatter[PerceivedDemographics]):
    dataset = "fairface"

    def __init__(self, root: Path, config: QAConfig):
        super().__init__(root, config)
        self.label_files = {
            split: name for split, name in LABEL_FILES.items() if (self.root / name).is_file()
        }
        if not self.label_files:
            raise FileNotFoundError(
                f"FairFace root {self.root} holds neither of {', '.join(LABEL_FILES.values())}"
            )

    def list_rows(self) -> list[InputRow[PerceivedDemographics]]:
        rows: list[InputRow[PerceivedDemographics]] = []
        for split, name in self.label_files.items():
            # utf-8-sig: spreadsheet programs save CSVs with a byte-order mark
            with open(self.root / name, newline="", encoding="utf-8-sig", errors="replace") as handle:
                lines = csv.reader(handle)
                readable = _readable(lines, self.root / name)
                header = [column.strip() for column in next(readable, [])]
                missing = [column for column in REQUIRED_COLUMNS if column not in header]
                for fields in readable:
                    if not any(field.strip() for field in fields):
                        continue
                    source = f"{name}:{lines.line_num}"
                    if missing:
                        rejection = Rejection("bad_header", f"header {header} lacks {missing}")
                        rows.append(InputRow(len(rows), source, split=split, rejection=rejection))
                    else:
                        rows.append(
                            self._parse(
                                len(rows),
                                source,
                                split,
                                dict(zip(header, fields, strict=False)),
                                len(fields) == len(header),
                            )
                        )
        return rows

    def _parse(
        self, index: int, source: str, split: str, record: dict[str, str], complete: bool
    ) -> InputRow[PerceivedDemographics]:
        if not complete:
            return InputRow(
                index,
                source,
                split=split,
                rejection=Rejection("wrong_column_count", "fields do not match the header"),
            )
        image, age, gender, race = (record[column].strip() for column in REQUIRED_COLUMNS)
        if not safe_relative(image):
            return InputRow(
                index, source, split=split, rejection=Rejection("bad_name", f"unsafe image path {image!r}")
            )
        if age not in AGE_BANDS or gender not in FAIRFACE_GENDERS or race not in RACES:
            detail = f"age {age!r}, gender {gender!r}, race {race!r}"
            return InputRow(index, source, image, split, rejection=Rejection("unknown_label", detail))
        return InputRow(
            index, source, image, split, PerceivedDemographics(age, FAIRFACE_GENDERS[gender], race)
        )

    def qa_pairs(self, row: InputRow[PerceivedDemographics]) -> list[tuple[str, QAPair]]:
        return [(row.split, pair) for pair in demographic_pairs(self.builder, row.image, row.label, RACES)]


def _readable(lines: Iterator[list[str]], path: Path) -> Iterator[list[str]]:
    """The CSV's rows; one csv cannot read (an unclosed quote runs a field past csv's size limit)
    stops the listing with a ValueError naming the file and line."""
    try:
        yield from lines
    except csv.Error as err:
        raise ValueError(f"{path}:{lines.line_num}: not a readable CSV: {err}") from None
