"""Strict answer parsing: a reply counts only when it states an answer, never when it merely contains one.

The rules, per answer style (every reply is first normalised: Unicode NFKC, lower case for word
matching, ``**bold**``, quotes and a leading "Answer:" / "The answer is" removed):

- **yes/no**: the reply must *start* with yes or no (or yeah, yep, yup, nope, true, false, correct,
  incorrect), as a word: "Yes", "no.", "Yes, the person is smiling" are read; "Yes or no",
  "I think so", "Perhaps" are not.
- **one letter** (multiple choice): the letter must stand as the answer: the whole reply ("B",
  "(b)", "B.", "Option B", "Answer: B"), or the letter followed by a delimiter and the option's
  text ("B. Fear", "B) fear"). "A person with ..." is not option A. A letter outside the options,
  or a letter whose trailing text names another option, is unparsed. A reply without a letter that
  names exactly one option (by the option's words or a synonym, "Happy") is read as that option.
- **several letters** (which attributes are present): only letters, separated by commas, "and",
  "&", ";" or spaces ("A, C", "A and C"), or "None" for no option; every letter must be an option.
- **open category** (expression, gender, race): the reply must name exactly one category of the
  task's label space, by its own words or a synonym (happy, happiness, joy; woman, female). Two
  categories ("happy or surprised"), none, or a negation outside the matched words ("not happy")
  leave it unparsed. Matching is by whole words, longest synonym first ("southeast asian" is not
  also "east asian"; "unhappy" is not "happy").
- **age**: numbers ("34", "34 years"), numbers in words ("thirty-four"), approximations ("about
  30"), ranges ("25-35", "between 25 and 35", "in their thirties") and open ranges ("over 70",
  "70+") are read as an interval of years; a point estimate is its middle (an open range: its
  lower end). An age band question is answered when the interval lies in one band. Two
  different ages ("30 or 40") or a negation are unparsed.

An unparsed reply counts as wrong, and each task reports its unparsed rate.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from facemllm.schemas.vocab import OPTION_LETTERS

PARSER_VERSION = "1"

QUOTES = " \"'\u201c\u201d\u2018\u2019"

YES_WORDS = {"yes", "yeah", "yep", "yup", "true", "correct"}
NO_WORDS = {"no", "nope", "false", "incorrect"}
NONE_REPLIES = {
    "none",
    "none of them",
    "none of the above",
    "none apply",
    "no option",
    "no options",
    "nothing",
}
NEGATIONS = re.compile(r"\b(?:not|no|never|neither|nor|without|cannot)\b|n't\b")
LEAD_IN = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:\-]?\s*|i\s+would\s+say\s*:?\s*)", re.I
)


def normalize(reply: str) -> str:
    """NFKC, markup and quotes removed, whitespace collapsed, lead-ins ("Answer:") dropped; case kept."""
    text = unicodedata.normalize("NFKC", reply).replace("\u2013", "-").replace("\u2014", "-")
    text = re.sub(r"[*_`]{1,3}([^*_`]+)[*_`]{1,3}", r"\1", text)  # **bold**, _it_, `code`
    text = " ".join(text.split()).strip(QUOTES)
    return LEAD_IN.sub("", text).strip(QUOTES)


def words(text: str) -> str:
    """Lower-case text with punctuation other than ``-`` and ``+`` turned into spaces (for word matching)."""
    lowered = text.lower().replace("_", " ").replace("\u2019", "'")
    return " ".join(re.sub(r"[^\w\s'+\-.]", " ", lowered).replace(". ", " ").rstrip(".").split())


# --- yes / no ------------------------------------------------------------------------------------


def parse_yes_no(reply: str) -> bool | None:
    text = words(normalize(reply))
    first, _, rest = text.partition(" ")
    first = first.strip(".,;:!")
    if first in YES_WORDS:
        answer = True
    elif first in NO_WORDS:
        answer = False
    else:
        return None
    if re.match(r"^(or|and|/)\s*(yes|no)\b", rest):  # "yes or no", "no and yes"
        return None
    return answer


# --- letters -------------------------------------------------------------------------------------

BARE_LETTER = re.compile(r"^(?:(?:option|choice|letter)\s*:?\s*)?\(?([A-Za-z])\)?\s*[.):]?$", re.I)
LETTER_WITH_TEXT = re.compile(r"^(?:(?:option|choice)\s*)?\(?([A-Za-z])\)?\s*[.):\-]\s+(.+)$", re.I)
LETTER_LIST = re.compile(r"^\(?[A-Za-z]\)?(?:\s*(?:,|;|&|\band\b|\s)\s*\(?[A-Za-z]\)?)*\.?$", re.I)


def parse_letter(reply: str, options: list[str], vocabulary: Vocabulary) -> int | None:
    """Index of the chosen option, or None; ``options`` are the label values in letter order."""
    text = normalize(reply)
    bare = BARE_LETTER.match(text)
    if bare:
        return _option_index(bare.group(1), len(options))
    with_text = LETTER_WITH_TEXT.match(text)
    if with_text:
        index = _option_index(with_text.group(1), len(options))
        named = vocabulary.restricted(options).match(with_text.group(2))
        return index if index is not None and named in (None, options[index]) else None
    named = vocabulary.restricted(options).match(text)
    return options.index(named) if named is not None else None


def parse_letters(reply: str, options: list[str]) -> set[int] | None:
    """Indexes of every chosen option (empty for "None"), or None when the reply is not a letter list."""
    text = normalize(reply)
    if words(text) in NONE_REPLIES:
        return set()
    if not LETTER_LIST.match(text):
        return None
    letters = re.findall(r"\b([A-Za-z])\b", re.sub(r"\band\b", ",", text, flags=re.I))
    indexes = [_option_index(letter, len(options)) for letter in letters]
    return None if None in indexes or not indexes else set(indexes)


def _option_index(letter: str, count: int) -> int | None:
    index = OPTION_LETTERS.find(letter.upper())
    return index if 0 <= index < count else None


# --- categories ----------------------------------------------------------------------------------


class Vocabulary:
    """The categories of one task with every phrase that names each (matched as whole words)."""

    def __init__(self, names: Mapping[str, Iterable[str]]):
        self.names = {
            value: tuple(dict.fromkeys(words(n) for n in phrases)) for value, phrases in names.items()
        }
        pairs = [(phrase, value) for value, phrases in self.names.items() for phrase in phrases if phrase]
        pairs.sort(key=lambda pair: -len(pair[0]))  # longest first: "southeast asian" before "asian"
        self.pattern = re.compile(
            "|".join(rf"(?<![\w-])({re.escape(phrase)})(?![\w-])" for phrase, _ in pairs) or r"(?!x)x"
        )
        self.values_by_group = [value for _, value in pairs]

    def restricted(self, values: Iterable[str]) -> Vocabulary:
        keep = set(values)
        return Vocabulary({v: p for v, p in self.names.items() if v in keep})

    def match(self, reply: str) -> str | None:
        """The one category the reply names, or None (none, several, or a negation outside the names)."""
        text = words(normalize(reply))
        found, rest = set(), text
        for match in self.pattern.finditer(text):
            found.add(self.values_by_group[match.lastindex - 1])
            rest = rest.replace(match.group(0), " ", 1)
        if len(found) != 1 or NEGATIONS.search(rest):
            return None
        return found.pop()


# --- ages ----------------------------------------------------------------------------------------

UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
DECADES = {f"{word[:-1]}ies": value for word, value in TENS.items()}  # twenties, thirties, ...
MAX_AGE = 120
NUMBER = r"\d+(?:\.\d+)?"


@dataclass(frozen=True)
class AgeReading:
    low: float
    high: float  # math.inf for "over 70"

    @property
    def point(self) -> float:
        return self.low if math.isinf(self.high) else (self.low + self.high) / 2


def _numbers_in_words(text: str) -> str:
    """ "thirty-four" -> "34", "seven" -> "7"; other words are kept."""
    tens = "|".join(TENS)
    units = "|".join(UNITS[1:10])

    def compound(match: re.Match) -> str:
        return str(TENS[match.group(1)] + UNITS.index(match.group(2)))

    text = re.sub(rf"\b({tens})[\s-]({units})\b", compound, text)
    text = re.sub(rf"\b({tens})\b", lambda m: str(TENS[m.group(1)]), text)
    return re.sub(rf"\b({'|'.join(UNITS)})\b", lambda m: str(UNITS.index(m.group(1))), text)


def parse_age(reply: str) -> AgeReading | None:
    text = words(normalize(reply))
    decade = re.search(rf"\b(?:early|mid|late)?[\s-]*({'|'.join(DECADES)}|\d0s)\b", text)
    if decade and not re.search(r"\d", text.replace(decade.group(1), "")):
        word = decade.group(1)
        low = DECADES[word] if word in DECADES else int(word[:-1])
        return None if NEGATIONS.search(text) else AgeReading(low, low + 9)
    text = _numbers_in_words(text)
    if NEGATIONS.search(text):
        return None
    months = re.fullmatch(rf".*?\b({NUMBER})\s*months?\b.*", text)
    if months and len(re.findall(NUMBER, text)) == 1:
        return _checked(float(months.group(1)) / 12, float(months.group(1)) / 12)
    open_range = re.search(
        rf"(?:\b(?:more than|over|older than|above|at least)\s+({NUMBER}))|(?:\b({NUMBER})\s*\+)", text
    )
    numbers = [float(n) for n in re.findall(NUMBER, text)]
    if open_range and len(numbers) == 1:
        return _checked(float(open_range.group(1) or open_range.group(2)), math.inf)
    span = re.search(rf"\b({NUMBER})\s*(?:-|to|and)\s*({NUMBER})\b", text)
    if span and len(numbers) == 2:
        low, high = sorted((float(span.group(1)), float(span.group(2))))
        return _checked(low, high)
    if len(set(numbers)) == 1:
        return _checked(numbers[0], numbers[0])
    return None


def _checked(low: float, high: float) -> AgeReading | None:
    return AgeReading(low, high) if 0 <= low <= MAX_AGE and (math.isinf(high) or high <= MAX_AGE) else None
