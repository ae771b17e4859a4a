"""CelebA's 40 attributes, in the file's column order, with the words questions and answers use.

``phrase`` names the attribute in option lists ("eyeglasses"); ``statement`` is a predicate about
"the person" ("is wearing eyeglasses"), so yes/no questions and composed descriptions read as
sentences. Subjective and demographic attributes are worded as perceptions ("appears male").
"""

from __future__ import annotations

from typing import NamedTuple


class AttributeWords(NamedTuple):
    phrase: str
    statement: str


CELEBA_ATTRIBUTES: dict[str, AttributeWords] = {
    "5_o_Clock_Shadow": AttributeWords("five o'clock shadow", "has a five o'clock shadow"),
    "Arched_Eyebrows": AttributeWords("arched eyebrows", "has arched eyebrows"),
    "Attractive": AttributeWords("attractive (as perceived)", "appears attractive"),
    "Bags_Under_Eyes": AttributeWords("bags under the eyes", "has bags under the eyes"),
    "Bald": AttributeWords("bald", "is bald"),
    "Bangs": AttributeWords("bangs", "has bangs"),
    "Big_Lips": AttributeWords("big lips", "has big lips"),
    "Big_Nose": AttributeWords("big nose", "has a big nose"),
    "Black_Hair": AttributeWords("black hair", "has black hair"),
    "Blond_Hair": AttributeWords("blond hair", "has blond hair"),
    "Blurry": AttributeWords("blurry photo", "appears blurry in the photo"),
    "Brown_Hair": AttributeWords("brown hair", "has brown hair"),
    "Bushy_Eyebrows": AttributeWords("bushy eyebrows", "has bushy eyebrows"),
    "Chubby": AttributeWords("chubby (as perceived)", "appears chubby"),
    "Double_Chin": AttributeWords("double chin", "has a double chin"),
    "Eyeglasses": AttributeWords("eyeglasses", "is wearing eyeglasses"),
    "Goatee": AttributeWords("goatee", "has a goatee"),
    "Gray_Hair": AttributeWords("gray hair", "has gray hair"),
    "Heavy_Makeup": AttributeWords("heavy makeup", "is wearing heavy makeup"),
    "High_Cheekbones": AttributeWords("high cheekbones", "has high cheekbones"),
    "Male": AttributeWords("male (as perceived)", "appears male"),
    "Mouth_Slightly_Open": AttributeWords("mouth slightly open", "has the mouth slightly open"),
    "Mustache": AttributeWords("mustache", "has a mustache"),
    "Narrow_Eyes": AttributeWords("narrow eyes", "has narrow eyes"),
    "No_Beard": AttributeWords("no beard", "has no beard"),
    "Oval_Face": AttributeWords("oval face", "has an oval face"),
    "Pale_Skin": AttributeWords("pale skin", "has pale skin"),
    "Pointy_Nose": AttributeWords("pointy nose", "has a pointy nose"),
    "Receding_Hairline": AttributeWords("receding hairline", "has a receding hairline"),
    "Rosy_Cheeks": AttributeWords("rosy cheeks", "has rosy cheeks"),
    "Sideburns": AttributeWords("sideburns", "has sideburns"),
    "Smiling": AttributeWords("smiling", "is smiling"),
    "Straight_Hair": AttributeWords("straight hair", "has straight hair"),
    "Wavy_Hair": AttributeWords("wavy hair", "has wavy hair"),
    "Wearing_Earrings": AttributeWords("earrings", "is wearing earrings"),
    "Wearing_Hat": AttributeWords("hat", "is wearing a hat"),
    "Wearing_Lipstick": AttributeWords("lipstick", "is wearing lipstick"),
    "Wearing_Necklace": AttributeWords("necklace", "is wearing a necklace"),
    "Wearing_Necktie": AttributeWords("necktie", "is wearing a necktie"),
    "Young": AttributeWords("young (as perceived)", "appears young"),
}
