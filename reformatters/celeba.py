"""CelebA: ``list_attr_celeba.txt`` + ``list_eval_partition.txt`` + ``img_align_celeba/``.

Layouts found under ``--root``: the official ``Anno/ Eval/ Img/`` folders, torchvision's
``celeba/`` folder (``root`` as torchvision takes it), or the contents of that folder. Images are
the aligned 178x218 crops. Tasks per image: yes/no questions about single attributes (half about
present ones where possible), "which of these are present" with lettered options, and a
description composed of the present attributes. Attributes held out for zero-shot evaluation never
appear in train, val or test samples; the images of ``zero_shot_from`` get one yes/no question per
held-out attribute in the extra split ``zeroshot``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from facemllm.reformatters.base import DatasetReformatter, InputRow, Rejection, safe_relative
from facemllm.reformatters.celeba_attributes import CELEBA_ATTRIBUTES
from facemllm.reformatters.config import QAConfig
from facemllm.reformatters.qa import QAPair

ATTRIBUTE_NAMES = tuple(CELEBA_ATTRIBUTES)
PARTITIONS = {"0": "train", "1": "val", "2": "test"}
ZERO_SHOT_SPLIT = "zeroshot"
IMAGE_FOLDER = "img_align_celeba"
# (attribute file, partition file, folder holding img_align_celeba), relative to --root
LAYOUTS = (
    ("Anno/list_attr_celeba.txt", "Eval/list_eval_partition.txt", "Img"),
    ("celeba/list_attr_celeba.txt", "celeba/list_eval_partition.txt", "celeba"),
    ("list_attr_celeba.txt", "list_eval_partition.txt", "."),
)

PresentAttributes = tuple[str, ...]  # in CelebA's column order


class CelebAReformatter(DatasetReformatter[PresentAttributes]):
    dataset = "celeba"

    def __init__(self, root: Path, config: QAConfig):
        super().__init__(root, config)
        layout = next((layout for layout in LAYOUTS if (self.root / layout[0]).is_file()), None)
        if layout is None:
            expected = ", ".join(layout[0] for layout in LAYOUTS)
            raise FileNotFoundError(f"CelebA root {self.root} holds none of {expected}")
        self.attribute_file, self.partition_file, images = layout
        if not (self.root / self.partition_file).is_file():
            raise FileNotFoundError(
                f"CelebA root {self.root} lacks {self.partition_file} (the official splits)"
            )
        self.image_base = self.root / images
        self.held_out = tuple(config.celeba.zero_shot_attributes)
        self.seen = tuple(name for name in ATTRIBUTE_NAMES if name not in self.held_out)

    def read_partitions(self) -> dict[str, str]:
        """Image name -> split; malformed lines are left out, so their images count as ``no_split``."""
        partitions = {}
        for line in (self.root / self.partition_file).read_text("utf-8-sig", errors="replace").splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1] in PARTITIONS:
                partitions[fields[0]] = PARTITIONS[fields[1]]
        return partitions

    def list_rows(self) -> list[InputRow[PresentAttributes]]:
        lines = (self.root / self.attribute_file).read_text("utf-8-sig", errors="replace").splitlines()
        first = 1 if lines and lines[0].strip().isdigit() else 0  # the count line, when present
        header = lines[first].split() if len(lines) > first else []
        header_error = None
        if sorted(header) != sorted(ATTRIBUTE_NAMES):
            missing, extra = set(ATTRIBUTE_NAMES) - set(header), set(header) - set(ATTRIBUTE_NAMES)
            header_error = (
                f"attribute names differ from CelebA's 40: missing {sorted(missing)}, extra {sorted(extra)}"
            )
        partitions = self.read_partitions()
        rows = []
        for number, line in enumerate(lines[first + 1 :], start=first + 2):
            if not line.strip():
                continue
            rows.append(
                self._parse(
                    len(rows), f"{self.attribute_file}:{number}", line, header, header_error, partitions
                )
            )
        return rows

    def _parse(
        self,
        index: int,
        source: str,
        line: str,
        header: list[str],
        header_error: str | None,
        partitions: dict[str, str],
    ) -> InputRow[PresentAttributes]:
        name, *values = line.split()
        image = f"{IMAGE_FOLDER}/{name}"
        split = partitions.get(name)
        rejection = None
        if header_error:
            rejection = Rejection("bad_header", header_error)
        elif not safe_relative(name) or "/" in name:
            rejection = Rejection("bad_name", f"image name {name!r} is not a plain file name")
        elif len(values) != len(header):
            rejection = Rejection("wrong_column_count", f"{len(values)} values for {len(header)} attributes")
        elif not set(values) <= {"1", "-1"}:
            rejection = Rejection(
                "unknown_label", f"values other than 1/-1: {sorted(set(values) - {'1', '-1'})}"
            )
        elif split is None:
            rejection = Rejection("no_split", f"{name} is not in {self.partition_file}")
        if rejection is not None:
            return InputRow(index, source, image, split, rejection=rejection)
        present = {attribute for attribute, value in zip(header, values, strict=True) if value == "1"}
        return InputRow(index, source, image, split, tuple(a for a in ATTRIBUTE_NAMES if a in present))

    def qa_pairs(self, row: InputRow[PresentAttributes]) -> list[tuple[str, QAPair]]:
        present = set(row.label)
        pairs: list[tuple[str, QAPair]] = []
        if self.builder.allows("yes_no"):
            rng = self.builder.rng(row.image, "attribute")
            pairs += [(row.split, self._yes_no(rng, name, present)) for name in self._asked(rng, present)]
        if self.builder.allows("multiple_choice"):
            pairs.append((row.split, self._selection(row.image, present)))
        if self.builder.allows("open"):
            pairs.append((row.split, self._description(row.image, present)))
        if row.split == self.config.celeba.zero_shot_from and self.builder.allows("yes_no"):
            rng = self.builder.rng(row.image, ZERO_SHOT_SPLIT)
            pairs += [(ZERO_SHOT_SPLIT, self._yes_no(rng, name, present)) for name in self.held_out]
        return pairs

    def _asked(self, rng: random.Random, present: set[str]) -> list[str]:
        """Seen attributes to ask about: half present where possible, the rest absent."""
        wanted = min(self.config.celeba.attribute_questions, len(self.seen))
        yes = [a for a in self.seen if a in present]
        no = [a for a in self.seen if a not in present]
        n_yes = max(min(len(yes), wanted // 2), wanted - len(no))  # few absent ones: ask more present
        chosen = set(rng.sample(yes, n_yes)) | set(rng.sample(no, wanted - n_yes))
        return [a for a in self.seen if a in chosen]

    def _yes_no(self, rng: random.Random, attribute: str, present: set[str]) -> QAPair:
        words = CELEBA_ATTRIBUTES[attribute]
        slots = {"statement": words.statement, "phrase": words.phrase}
        return self.builder.yes_no(
            rng, "attribute", slots, attribute, [attribute] if attribute in present else []
        )

    def _selection(self, image: str, present: set[str]) -> QAPair:
        rng = self.builder.rng(image, "attribute_selection")
        size = self.config.celeba.selection_options
        yes = [a for a in self.seen if a in present]
        no = [a for a in self.seen if a not in present]
        fewest = max(0, size - len(no))  # up to half the options are present, more only if too few are absent
        n_yes = rng.randint(fewest, max(fewest, min(len(yes), math.ceil(size / 2))))
        options = rng.sample(yes, n_yes) + rng.sample(no, size - n_yes)
        phrases = {a: CELEBA_ATTRIBUTES[a].phrase for a in options}
        return self.builder.multi_choice(rng, "attribute_selection", options, phrases, present)

    def _description(self, image: str, present: set[str]) -> QAPair:
        rng = self.builder.rng(image, "attribute_description")
        shown = [a for a in self.seen if a in present]
        statements = [CELEBA_ATTRIBUTES[a].statement for a in shown]
        if not statements:
            sentence = "None of the listed facial attributes is clearly present."
        elif len(statements) == 1:
            sentence = f"The person {statements[0]}."
        else:
            sentence = f"The person {', '.join(statements[:-1])} and {statements[-1]}."
        return self.builder.open(rng, "attribute_description", shown, "", answer=sentence)
