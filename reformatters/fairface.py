"""FairFace: ``fairface_label_{train,val}.csv`` + the ``train/`` and ``val/`` image folders.

The header is ``file,age,gender,race,service_test``; columns are found by name, so a reordered
header or one without ``service_test`` still parses, while a header lacking ``file``, ``age``,
``gender`` or ``race`` rejects every row of that file as ``bad_header``. The split is the label
file's (train or val). Values must be FairFace's own: age bins 0-2 ... more than 70, Male/Female,
and seven race categories.
"""

from __future__ import annotations

import csv
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
            with open(self.root / name, newline="", errors="replace") as handle:
                lines = csv.reader(handle)
                header = [column.strip() for column in next(lines, [])]
                missing = [column for column in REQUIRED_COLUMNS if column not in header]
                for fields in lines:
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
