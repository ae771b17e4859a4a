"""UTKFace: labels live in file names, ``[age]_[gender]_[race]_[date&time].jpg``.

Every file under ``--root`` is an input (point it at one set: ``UTKFace/`` of aligned-cropped
``.jpg.chip.jpg`` files, ``crop_part1/``, or the in-the-wild ``part1..3/``). Names that break the
scheme (a missing race field, a space before the extension, a missing dot) are rejected as
``bad_name``. Gender 0 male, 1 female; race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.

UTKFace has no official split. Ours is stratified and seeded: files are grouped by (age band,
gender, race); within a group they are ordered by sha256 of ``{seed}/{relative path}``, and the
file at position i of n goes to the first split whose cumulative fraction exceeds (i + 0.5) / n.
Each group is thus divided in the configured proportions (train 0.8, val 0.1, test 0.1 by
default), and a file's split depends only on its group and the seed.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import replace

from facemllm.reformatters.base import DatasetReformatter, InputRow, Rejection
from facemllm.reformatters.demographics import PerceivedDemographics, demographic_pairs
from facemllm.reformatters.qa import Category, LabelSpace, QAPair
from facemllm.schemas.vocab import UTKFACE_GENDER_IDS, UTKFACE_RACE_IDS, age_band

NAME = re.compile(r"(?P<age>\d+)_(?P<gender>\d+)_(?P<race>\d+)_(?P<taken>\d+)\.jpg(?:\.chip\.jpg)?")
MAX_AGE = 116
OTHER_RACE = "of another race (not White, Black, Asian or Indian)"
RACES = LabelSpace(
    Category(race, race.capitalize(), OTHER_RACE if race == "other" else race.capitalize())
    for race in UTKFACE_RACE_IDS.values()
)


class UTKFaceReformatter(DatasetReformatter[PerceivedDemographics]):
    dataset = "utkface"

    def list_rows(self) -> list[InputRow[PerceivedDemographics]]:
        files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        rows = [self._parse(index, path) for index, path in enumerate(files)]
        return self._assign_splits(rows)

    def _parse(self, index: int, path: str) -> InputRow[PerceivedDemographics]:
        try:
            path.encode()
        except UnicodeEncodeError:  # a name that is not UTF-8 (surrogate-escaped): status rows must encode
            shown = path.encode(errors="surrogateescape").decode(errors="replace")
            return InputRow(index, shown, shown, rejection=Rejection("bad_name", "path is not valid UTF-8"))
        match = NAME.fullmatch(path.rsplit("/", 1)[-1])
        if match is None:
            return InputRow(
                index,
                path,
                path,
                rejection=Rejection("bad_name", "not [age]_[gender]_[race]_[date&time].jpg"),
            )
        age, gender, race = int(match["age"]), match["gender"], match["race"]
        if age > MAX_AGE or gender not in UTKFACE_GENDER_IDS or race not in UTKFACE_RACE_IDS:
            detail = f"age {age} (0-{MAX_AGE}), gender {gender} (0-1), race {race} (0-4)"
            return InputRow(index, path, path, rejection=Rejection("unknown_label", detail))
        labels = PerceivedDemographics(
            age_band(age), UTKFACE_GENDER_IDS[gender], UTKFACE_RACE_IDS[race], age=age
        )
        return InputRow(index, path, path, label=labels)

    def _assign_splits(
        self, rows: list[InputRow[PerceivedDemographics]]
    ) -> list[InputRow[PerceivedDemographics]]:
        options = self.config.utkface
        bounds = ((options.train, "train"), (options.train + options.val, "val"), (float("inf"), "test"))
        strata: dict[tuple[str, str, str], list[InputRow]] = defaultdict(list)
        for row in rows:
            if row.rejection is None:
                strata[(row.label.age_band, row.label.gender, row.label.race)].append(row)
        splits = {}
        for members in strata.values():
            members.sort(key=lambda r: hashlib.sha256(f"{self.config.seed}/{r.image}".encode()).hexdigest())
            for position, row in enumerate(members):
                quantile = (position + 0.5) / len(members)
                splits[row.row] = next(split for bound, split in bounds if quantile < bound)
        return [replace(row, split=splits.get(row.row)) for row in rows]

    def qa_pairs(self, row: InputRow[PerceivedDemographics]) -> list[tuple[str, QAPair]]:
        return [(row.split, pair) for pair in demographic_pairs(self.builder, row.image, row.label, RACES)]
