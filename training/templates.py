"""Chat templates for models assembled here, and the conversion of LLaVA-style conversations.

A checkpoint keeps the template it was trained with (saved with its processor), so that vLLM and
``apply_chat_template`` render prompts exactly as training did. Models loaded whole (SmolVLM,
llava-hf) keep their own template; a LLaVA assembled from a vision tower and a causal LM gets one
of these presets (``model.chat_template``), because a text-only LM's template knows no images.

Every preset accepts a message's ``content`` either as a string or as OpenAI/HF-style parts
(``{"type": "image"}``, ``{"type": "text", "text": ...}``), and renders an image part as the
processor's ``<image>`` placeholder, which the processor expands to the model's image tokens.
"""

from __future__ import annotations

import re
from typing import Any

_CONTENT = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# LLaVA-1.5 style: "USER: <image>\nquestion ASSISTANT: answer</s>"
LLAVA_TEMPLATE = (
    _CONTENT + "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) + '\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + render(message['content']) + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# ChatML (Qwen2/2.5, SmolLM2 instruct tokenizers carry <|im_start|> and <|im_end|>)
CHATML_TEMPLATE = (
    _CONTENT + "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + render(message['content']) + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Idefics3 / SmolVLM style: "User:<image> question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
IDEFICS3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

PRESETS = {"llava": LLAVA_TEMPLATE, "chatml": CHATML_TEMPLATE, "idefics3": IDEFICS3_TEMPLATE}

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


def resolve_template(name_or_text: str) -> str:
    """A preset name (llava, chatml, idefics3) or a Jinja template given verbatim."""
    return PRESETS.get(name_or_text, name_or_text)


def conversation_to_messages(conversations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """LLaVA ``[{"from": "human", "value": "<image>\\n..."}, ...]`` -> chat messages with content parts.

    Returns the messages and the number of images they reference. A ``<image>`` placeholder becomes
    an image part where it stands; whitespace around it is dropped, so ``"<image>\\nWhat ..."`` and
    ``"What ...\\n<image>"`` both render as the template puts them. Messages already in
    ``{"role", "content"}`` form are accepted too.
    """
    messages: list[dict[str, Any]] = []
    images = 0
    for turn in conversations:
        if "role" in turn:
            role, value = turn["role"], turn["content"]
        else:
            role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise ValueError(f"unknown conversation role {role!r}")
        role = ROLES[role]
        if isinstance(value, list):  # already parts
            images += sum(1 for part in value if part.get("type") == "image")
            messages.append({"role": role, "content": value})
            continue
        if not isinstance(value, str):
            raise ValueError(f"conversation value of type {type(value).__name__}, expected a string")
        if IMAGE_PLACEHOLDER not in value or role == "assistant":
            messages.append({"role": role, "content": value})
            continue
        parts: list[dict[str, Any]] = []
        for index, chunk in enumerate(re.split(re.escape(IMAGE_PLACEHOLDER), value)):
            if index:
                parts.append({"type": "image"})
                images += 1
            if chunk.strip():
                parts.append({"type": "text", "text": chunk.strip()})
        messages.append({"role": role, "content": parts})
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    return messages, images
