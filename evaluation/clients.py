"""Model clients: our checkpoint in-process, or any OpenAI-compatible endpoint; both decode greedily.

A question is the sample's conversation up to its last answer, turned into chat messages by the
trainer's own conversion, so a checkpoint sees the prompt it was trained on; the checkpoint's
chat template renders it, in-process through ``apply_chat_template`` and on a vLLM server through
the same template file. Both clients answer a list of questions and yield each reply as it is
ready, so the caller can record it at once (a killed run loses nothing it had received).

- ``CheckpointModel``: transformers' ``generate`` on batches sorted by prompt length, left padded.
- ``EndpointModel``: the annotate stage's ``ChatClient`` (concurrency, retries with backoff,
  ``Retry-After``, an API key from the environment); a request that fails for good becomes a reply
  with an error, never an exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from facemllm.annotators.annotate_config import ClientSettings
from facemllm.annotators.mllm_client import (
    ChatClient,
    RequestFailure,
    image_data_url,
    normalize_base_url,
    redact_url,
)
from facemllm.schemas import QASample
from facemllm.schemas.evaluation import ModelInfo
from facemllm.training.templates import conversation_to_messages

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class Question:
    key: str
    image: bytes
    messages: list[dict[str, Any]]  # content parts: {"type": "image"} and {"type": "text", "text": ...}

    @classmethod
    def from_sample(cls, sample: QASample, image: bytes) -> Question:
        turns = [turn.model_dump() for turn in sample.conversations]
        messages, _ = conversation_to_messages(turns)
        return cls(sample.key, image, messages[:-1])  # all but the reference answer

    @property
    def text(self) -> str:
        """The last user turn's text, for reports."""
        content = self.messages[-1]["content"]
        if isinstance(content, str):
            return content
        return "\n".join(part["text"] for part in content if part["type"] == "text")


@dataclass(frozen=True)
class Reply:
    text: str | None
    error: str | None = None


class ModelClient(Protocol):
    info: ModelInfo
    generation: dict[str, Any]

    def answer(self, questions: list[Question]) -> Iterator[tuple[Question, Reply]]: ...

    def close(self) -> None: ...


def checkpoint_identity(folder: Path) -> str:
    """Hash of the config files and the weight files' names, sizes and modification times
    (re-hashing gigabytes of weights on every run would cost more than the evaluation of a subset)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        elif path.suffix in (".json", ".jinja"):
            digest.update(path.name.encode() + b"\n" + path.read_bytes())
    return digest.hexdigest()[:16]


class CheckpointModel:
    """A transformers image-text-to-text checkpoint (ours, or any on local disk), batched greedy decoding."""

    def __init__(
        self, label: str, folder: str, max_new_tokens: int, batch_size: int, device: str, dtype: str
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from facemllm.training.model import family_of

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
        self.device = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
        )
        torch_dtype = {
            "auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        self.model = (
            AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        )
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        self.nested_images = family_of(self.model.config.model_type).image_layout == "per_sample"
        self.batch_size = batch_size
        self.generation = {
            "do_sample": False,
            "temperature": 0.0,
            "max_new_tokens": max_new_tokens,
            "dtype": str(torch_dtype).removeprefix("torch."),
        }
        self.info = ModelInfo(
            label=label, kind="checkpoint", target=str(path.resolve()), identity=checkpoint_identity(path)
        )

    def answer(self, questions: list[Question]) -> Iterator[tuple[Question, Reply]]:
        import torch
        from PIL import Image

        prompts = {
            q.key: self.processor.apply_chat_template(q.messages, add_generation_prompt=True)
            for q in questions
        }
        ordered = sorted(questions, key=lambda q: (len(prompts[q.key]), q.key))  # less padding per batch
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            images = [Image.open(io.BytesIO(q.image)).convert("RGB") for q in batch]
            inputs = self.processor(
                text=[prompts[q.key] for q in batch],
                images=[[image] for image in images] if self.nested_images else images,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=self.generation["max_new_tokens"],
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                )
            texts = self.processor.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for question, text in zip(batch, texts, strict=True):
                # a reply cut by max_new_tokens may end inside a multi-byte character; a server's
                # incremental detokenizer holds such bytes back, so drop them here too
                yield question, Reply(text.rstrip("\ufffd").strip())

    def close(self) -> None:
        del self.model


class EndpointModel:
    """An OpenAI-compatible chat endpoint (vLLM, or any hosted API) serving one model."""

    def __init__(
        self, label: str, base_url: str, model: str | None, max_new_tokens: int, settings: ClientSettings
    ):
        self.base_url = normalize_base_url(base_url)
        self.settings = settings
        self.model = model or self._only_served_model()
        self.generation = {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_new_tokens}
        identity = hashlib.sha256(f"{redact_url(self.base_url)}\n{self.model}".encode()).hexdigest()[:16]
        self.info = ModelInfo(
            label=label,
            kind="endpoint",
            target=redact_url(self.base_url),
            served_model=self.model,
            identity=identity,
        )

    def _only_served_model(self) -> str:
        """The served model's name when the server serves exactly one (vLLM does)."""
        import httpx

        key = os.environ.get(self.settings.api_key_env)
        response = httpx.get(
            f"{self.base_url}/models",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=self.settings.connect_timeout_s,
        )
        response.raise_for_status()
        body = response.json()  # outside data: only an object with a list of {"id": str} counts
        entries = body.get("data") if isinstance(body, dict) else None
        names = (
            [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
            if isinstance(entries, list)
            else []
        )
        if len(names) != 1:
            raise ValueError(f"{redact_url(self.base_url)} serves {names[:5]}: name the model as URL#MODEL")
        return names[0]

    def payload(self, question: Question) -> dict[str, Any]:
        messages = []
        for message in question.messages:
            content = message["content"]
            if not isinstance(content, str):
                content = [
                    {"type": "image_url", "image_url": {"url": image_data_url(question.image)}}
                    if part["type"] == "image"
                    else part
                    for part in content
                ]
            messages.append({"role": message["role"], "content": content})
        return {"model": self.model, "messages": messages, **self.generation}

    def answer(self, questions: list[Question]) -> Iterator[tuple[Question, Reply]]:
        """Runs the requests on an event loop in this thread, yielding replies in completion order."""
        loop = asyncio.new_event_loop()
        done: asyncio.Queue = asyncio.Queue()
        requests = loop.create_task(self._ask_all(questions, done))
        try:
            for _ in questions:
                yield loop.run_until_complete(done.get())
            loop.run_until_complete(requests)
        finally:  # the caller stopped early (an interrupt): cancel what is still in flight
            requests.cancel()
            loop.run_until_complete(asyncio.gather(requests, return_exceptions=True))
            loop.close()

    async def _ask_all(self, questions: list[Question], done: asyncio.Queue) -> None:
        gate = asyncio.Semaphore(self.settings.concurrency)
        async with ChatClient(self.base_url, self.settings) as client:

            async def ask(question: Question) -> None:
                async with gate:
                    try:
                        body, _ = await client.complete(self.payload(question))
                        reply = Reply(body["choices"][0]["message"]["content"].strip())
                    except RequestFailure as err:
                        reply = Reply(None, f"{err.reason}: {err}")
                    except Exception as err:  # an odd server must not stop the run: record it
                        reply = Reply(None, f"client_error: unexpected {type(err).__name__}: {err}")
                await done.put((question, reply))

            await asyncio.gather(*(ask(question) for question in questions))

    def close(self) -> None:
        pass


def request_identity(info: ModelInfo, generation: dict[str, Any], question: Question) -> str:
    """What decides a reply: the model, the decoding settings, the prompt and the image bytes."""
    payload = {
        "model": info.identity,
        "generation": generation,
        "messages": question.messages,
        "image": hashlib.sha256(question.image).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
