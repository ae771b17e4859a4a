"""The one QA builder every dataset uses: a label in, question-answer pairs in three styles out.

Randomness (which paraphrase, which distractors, option order, yes/no candidate) comes from a
``random.Random`` seeded by a sha256 of (seed, dataset, image, task): never from Python's
``hash()`` or global state, so a Beam worker, a rerun and a local call give the same samples, and
changing one task's settings leaves the other tasks' samples as they were.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from facemllm.reformatters.config import QAConfig
from facemllm.reformatters.templates import (
    MULTI_CHOICE_INSTRUCTIONS,
    NO,
    NO_OPTION_APPLIES,
    SINGLE_CHOICE_INSTRUCTIONS,
    TEMPLATES,
    YES,
)
from facemllm.schemas import AnswerStyle, QALabel, QATask, SourceDataset
from facemllm.schemas.vocab import OPTION_LETTERS

ANSWER_STYLES: tuple[AnswerStyle, ...] = ("open", "multiple_choice", "yes_no")


@dataclass(frozen=True)
class Category:
    """One value of a label space and how it reads as an option and inside a sentence."""

    value: str
    option: str
    phrase: str


class LabelSpace:
    """The categories of one task in one dataset: where multiple-choice distractors come from."""

    def __init__(self, categories: Iterable[Category]):
        self.categories = {c.value: c for c in categories}

    @classmethod
    def plain(cls, values: dict[str, str]) -> LabelSpace:
        """Categories whose option text and phrase are the same words."""
        return cls(Category(value, words, words) for value, words in values.items())

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self.categories)

    def __contains__(self, value: object) -> bool:
        return value in self.categories

    def __getitem__(self, value: str) -> Category:
        return self.categories[value]


@dataclass(frozen=True)
class QAPair:
    """One question and its answer, before it gets a key, a split and an image."""

    task: QATask
    answer_style: AnswerStyle
    template_id: str
    question: str
    answer: str
    label: QALabel


def lettered(options: Sequence[str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(OPTION_LETTERS, options, strict=False))


class QABuilder:
    """Turns one image's labels into QA pairs; the same inputs always give the same pairs."""

    def __init__(self, config: QAConfig, dataset: SourceDataset):
        self.config = config
        self.dataset = dataset

    def rng(self, image: str, task: str) -> random.Random:
        digest = hashlib.sha256(
            f"{self.config.seed}\x1f{self.dataset}\x1f{image}\x1f{task}".encode()
        ).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def allows(self, style: AnswerStyle) -> bool:
        return style in self.config.answer_styles

    def categorical(self, image: str, task: QATask, truth: str, space: LabelSpace) -> list[QAPair]:
        """``styles_per_task`` questions in distinct styles, drawn from the configured ones."""
        rng = self.rng(image, task)
        styles = [style for style in ANSWER_STYLES if self.allows(style)]
        chosen = rng.sample(styles, min(self.config.styles_per_task, len(styles)))
        pairs = []
        for style in sorted(chosen, key=ANSWER_STYLES.index):
            if style == "open":
                pairs.append(self.open(rng, task, [truth], space[truth].phrase))
            elif style == "multiple_choice":
                pairs.append(self.single_choice(rng, task, truth, space))
            else:
                candidate = truth
                others = [value for value in space.values if value != truth]
                if others and rng.random() < 0.5:
                    candidate = rng.choice(others)
                pairs.append(
                    self.yes_no(rng, task, {"candidate": space[candidate].phrase}, candidate, [truth])
                )
        return pairs

    def open(
        self, rng: random.Random, task: QATask, truth: list[str], phrase: str, answer: str = ""
    ) -> QAPair:
        """An open question; the reply is the task's answer sentence unless ``answer`` is given."""
        index, question = self._pick(rng, TEMPLATES[task].ask)
        answer = answer or TEMPLATES[task].open_answer.format(phrase=phrase)
        return QAPair(
            task, "open", f"{task}/open/{index}", question, answer, QALabel(answer=answer, truth=truth)
        )

    def single_choice(self, rng: random.Random, task: QATask, truth: str, space: LabelSpace) -> QAPair:
        """Lettered options: the truth and distractors from the label space, in shuffled order."""
        distractors = [value for value in space.values if value != truth]
        drawn = [truth, *rng.sample(distractors, min(self.config.choices - 1, len(distractors)))]
        texts = {value: space[value].option for value in drawn}
        options, template_id, question = self._lettered(rng, task, drawn, texts, SINGLE_CHOICE_INSTRUCTIONS)
        answer = OPTION_LETTERS[options.index(truth)]
        label = QALabel(answer=answer, truth=[truth], options=options)
        return QAPair(task, "multiple_choice", template_id, question, answer, label)

    def multi_choice(
        self, rng: random.Random, task: QATask, options: list[str], texts: dict[str, str], correct: set[str]
    ) -> QAPair:
        """Lettered options of which any number (possibly none) apply; ``options`` are shuffled here."""
        options, template_id, question = self._lettered(rng, task, options, texts, MULTI_CHOICE_INSTRUCTIONS)
        answer = (
            ", ".join(OPTION_LETTERS[i] for i, o in enumerate(options) if o in correct) or NO_OPTION_APPLIES
        )
        label = QALabel(answer=answer, truth=[o for o in options if o in correct], options=options)
        return QAPair(task, "multiple_choice", template_id, question, answer, label)

    def _lettered(
        self,
        rng: random.Random,
        task: QATask,
        options: list[str],
        texts: dict[str, str],
        instructions: Sequence[str],
    ) -> tuple[list[str], str, str]:
        """Shuffled options, the template id and the question: stem, lettered options, instruction."""
        options = list(options)
        rng.shuffle(options)
        index, stem = self._pick(rng, TEMPLATES[task].ask)
        instruction_index, instruction = self._pick(rng, instructions)
        question = f"{stem}\n{lettered([texts[o] for o in options])}\n{instruction}"
        return options, f"{task}/multiple_choice/{index}-{instruction_index}", question

    def yes_no(
        self, rng: random.Random, task: QATask, slots: dict[str, str], asked: str, truth: list[str]
    ) -> QAPair:
        """A yes/no question filled from ``slots`` about ``asked``; the answer is Yes if it is in ``truth``."""
        index, template = self._pick(rng, TEMPLATES[task].yes_no)
        answer = YES if asked in truth else NO
        return QAPair(
            task,
            "yes_no",
            f"{task}/yes_no/{index}",
            template.format(**slots),
            answer,
            QALabel(answer=answer, truth=truth, asked=asked),
        )

    @staticmethod
    def _pick(rng: random.Random, bank: Sequence[str]) -> tuple[int, str]:
        index = rng.randrange(len(bank))
        return index, bank[index]
