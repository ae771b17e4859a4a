"""Question template banks: many paraphrases per task, so a model learns the task, not one string.

Each task has questions that ask for the value (used by open and multiple-choice samples) and
yes/no questions that propose a value (``{candidate}``; CelebA's attribute questions use
``{statement}``, a predicate such as "is wearing eyeglasses", or ``{phrase}``, a short name such
as "eyeglasses"). Demographic questions ask what the person *appears* to be: the labels are
annotators' perceptions, never anyone's identity.

Template ids are ``task/style/index`` (``-instruction`` for multiple choice): indexes are stable,
so add new paraphrases at the end of a tuple, never in the middle.
"""

from __future__ import annotations

from dataclasses import dataclass

from facemllm.schemas import QATask


@dataclass(frozen=True)
class TaskTemplates:
    """The paraphrases of one task and the sentence its open answers use."""

    ask: tuple[str, ...] = ()  # ask for the value: open and multiple-choice questions
    yes_no: tuple[str, ...] = ()  # propose a value; each ends by asking for yes or no
    open_answer: str = "{phrase}"  # the open reply, from the value's phrase


PERCEIVED_AS = (
    "Does this person appear to be {candidate}? Answer yes or no.",
    "Would you perceive the person in this image as {candidate}? Answer yes or no.",
    "Based on appearance alone, does the person shown look {candidate}? Reply yes or no.",
    "Is the person in the photo likely to be perceived as {candidate}? Answer with yes or no.",
    "Judging only by appearance, would you say this person is {candidate}? Please answer yes or no.",
)

TEMPLATES: dict[QATask, TaskTemplates] = {
    "expression": TaskTemplates(
        ask=(
            "What facial expression does this person show?",
            "Which emotion is expressed on this face?",
            "How would you describe the facial expression in this image?",
            "What emotion does the person in the photo appear to feel?",
            "Identify the expression on this person's face.",
            "Look at the face. Which basic emotion does it display?",
            "What is the dominant facial expression of the person shown?",
            "Classify the facial expression of this person.",
            "Which of the basic emotions best matches this face?",
            "Describe the emotion conveyed by this person's face.",
        ),
        yes_no=(
            "Does this person's face show {candidate}? Answer yes or no.",
            "Would you say this face expresses {candidate}? Please answer yes or no.",
            "Is the person displaying {candidate}? Answer with yes or no.",
            "Does the expression on this face convey {candidate}? Reply yes or no.",
            "Look at the face: does it show {candidate}? Answer yes or no.",
            "Is {candidate} visible on this person's face? Answer yes or no.",
        ),
        open_answer="The facial expression shows {phrase}.",
    ),
    "age": TaskTemplates(
        ask=(
            "How old does this person appear to be, in years?",
            "Estimate the apparent age of the person in this image in years.",
            "What is the apparent age of this person? Give a number of years.",
            "Guess how many years old this person looks.",
            "About how many years old does the person in the photo look?",
            "Judging by appearance, what age in years would you estimate for this person?",
            "How many years old would you say this person looks?",
            "Give your best estimate of this person's apparent age in years.",
        ),
        open_answer="The person appears to be about {phrase} old.",
    ),
    "age_band": TaskTemplates(
        ask=(
            "How old does this person appear to be?",
            "What age range does the person in this image appear to fall into?",
            "Estimate the apparent age group of this person.",
            "Which age bracket best fits how the person shown looks?",
            "Judging by appearance, how old is this person?",
            "What is the perceived age range of the face in this photo?",
            "Based on appearance, in which age group would you place this person?",
            "Roughly how old does the person in the picture look?",
        ),
        yes_no=(
            "Does this person appear to be {candidate}? Answer yes or no.",
            "Does the person in this photo look {candidate}? Reply yes or no.",
            "Based on appearance, is this person {candidate}? Answer yes or no.",
            "Does the face look like that of someone {candidate}? Answer with yes or no.",
            "Judging by appearance alone, would you say this person is {candidate}? Please answer yes or no.",
        ),
        open_answer="The person appears to be {phrase}.",
    ),
    "gender": TaskTemplates(
        ask=(
            "What gender does this person appear to be?",
            "Based on appearance, what is the perceived gender of the person in this image?",
            "Does the person in the photo appear to be male or female?",
            "How would you describe the apparent gender of this person?",
            "What is the perceived gender of the face shown?",
            "Judging only by appearance, which gender does this person present as?",
            "From the face alone, what gender would most people perceive?",
        ),
        yes_no=PERCEIVED_AS,
        open_answer="The person appears to be {phrase}.",
    ),
    "race": TaskTemplates(
        ask=(
            "What is the perceived race of the person in this image?",
            "Which racial group does this person appear to belong to?",
            "Based on appearance, how would you describe this person's apparent race?",
            "What race does the person in this photo appear to be?",
            "Judging only by appearance, which racial category fits this person best?",
            "Describe the apparent racial background of the person shown.",
            "From the face alone, what race would most people perceive?",
        ),
        yes_no=PERCEIVED_AS,
        open_answer="The person appears to be {phrase}.",
    ),
    "attribute": TaskTemplates(
        yes_no=(
            "Is it true that the person in this image {statement}? Answer yes or no.",
            "True or false: the person in the photo {statement}. Answer yes or no.",
            "Would you say that the person shown {statement}? Please answer yes or no.",
            "Looking at this face, would you agree that the person {statement}? Answer with yes or no.",
            'Is the attribute "{phrase}" present in this face? Answer yes or no.',
            'Does this face show the attribute "{phrase}"? Reply yes or no.',
            'Check the image: does "{phrase}" apply to this person? Answer yes or no.',
            'Answer yes or no: does "{phrase}" describe the person in the image?',
        ),
    ),
    "attribute_selection": TaskTemplates(
        ask=(
            "Which of the following attributes are present in this face?",
            "Select every attribute below that applies to the person in the image.",
            "Which of these facial attributes can you see in the photo?",
            "Look at the face and pick all of the listed attributes that are present.",
            "Which of the options describe the person shown?",
            "Mark each attribute in the list that this face has.",
        ),
    ),
    "attribute_description": TaskTemplates(
        ask=(
            "Describe the facial attributes of the person in this image.",
            "List the visible facial attributes of this person.",
            "What facial attributes does this face have?",
            "Give a short description of this person's facial features and accessories.",
            "Which notable facial attributes can you see in this photo?",
            "Summarise the appearance of the face in this image.",
            "Describe this person's hair, face and accessories.",
        ),
    ),
}

SINGLE_CHOICE_INSTRUCTIONS = (
    "Answer with the option's letter from the given choices directly.",
    "Reply with the letter of the correct option.",
    "Choose one option and answer with its letter.",
    "Respond with only the letter of the best answer.",
)

MULTI_CHOICE_INSTRUCTIONS = (
    'Answer with the letters of all options that apply, separated by commas, or "None" if none apply.',
    'List the letters of every correct option, separated by commas; answer "None" if no option applies.',
    'Reply with the letters of the options that are present, comma-separated, or "None".',
)

NO_OPTION_APPLIES = "None"
YES, NO = "Yes", "No"
