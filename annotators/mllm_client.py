"""The MLLM face annotator: an async OpenAI-compatible chat client with our prompts (no Beam).

One request per face: the context crop as a base64 data URL, the versioned prompt, and (by default)
vLLM's ``response_format: json_schema`` built from ``schemas.FaceResponse``, so the server's
constrained decoder can only emit an object with a caption and every attribute. The answer is
parsed (``json.loads(strict=False)``: constrained strings may still hold raw control characters)
and validated with pydantic; an invalid answer gets one repair request that quotes the error; a
second failure is recorded as ``invalid_output``.

Transport: ``httpx.AsyncClient`` with as many connections as ``concurrency``; the caller bounds
requests in flight with ``concurrency`` too, which is what keeps a vLLM server's batch full. Read
timeouts, connection errors, HTTP 429 and 5xx, and bodies that are not a chat completion are
retried with exponential backoff and jitter (``Retry-After`` honoured), up to ``max_retries``;
other 4xx (a prompt too long for the context, a wrong model name) fail at once. Every failure ends
as an ``Outcome`` with a named status, never as an exception out of ``annotate``.

The server is not trusted. Each request has an overall deadline (``deadline_s``: httpx's timeout
is per read, so a server trickling one byte a second would otherwise hold it forever); a reply is
read in chunks and refused past ``max_response_bytes``, both as sent and as inflated (httpx
inflates without a bound); token counts outside ``[0, MAX_USAGE_TOKENS]`` are ignored.

The API key is read from the environment variable named by ``api_key_env`` and sent as a bearer
token; it is never logged, never stored, and the server recorded in provenance is
``scheme://host:port`` only. A server that echoes the key back (in an error body, even in a
caption) gets it replaced by ``[redacted]`` before anything of its reply is kept.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import random
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from facemllm.annotators.annotate_config import AnnotateConfig, ClientSettings
from facemllm.annotators.prompts import Prompt, load_prompt
from facemllm.annotators.request_cache import request_key
from facemllm.pipeline.core.ratelimit import RateLimit
from facemllm.schemas.annotation import MAX_USAGE_TOKENS, FaceAttributes, FaceResponse, Provenance, TokenUsage

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")
FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")
REDACTED = "[redacted]"
ACCEPTED_ENCODINGS = "gzip, deflate"  # the encodings BoundedBody inflates; asked for explicitly


def redact_url(url: str) -> str:
    """``scheme://host:port`` of a URL: no credentials, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def normalize_base_url(url: str) -> str:
    """A base URL for the OpenAI routes: ``http://h:8000`` and ``http://h:8000/`` become ``.../v1``."""
    url = url.rstrip("/")
    if not urlsplit(url).path:
        url += "/v1"
    return url


def response_schema(caption_max_chars: int) -> dict:
    """JSON Schema of ``FaceResponse`` with the caption bounded (a constrained decoder then closes
    the string in time even when the model would not)."""
    schema = FaceResponse.model_json_schema()
    schema["properties"]["caption"]["maxLength"] = caption_max_chars
    return schema


class RequestFailure(Exception):
    """A request that failed for good: ``reason`` is an ``AnnotationOutcome``."""

    def __init__(self, reason: str, message: str, attempts: int):
        super().__init__(message)
        self.reason = reason
        self.attempts = attempts


class _Retryable(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class Redactor:
    """Replaces secrets in anything a server sent before it is kept: error text, reply bodies.

    A JSON body may spell ``/`` as ``\\/``; both spellings are replaced."""

    def __init__(self, secrets: list[str]):
        spellings = {
            spelling for secret in secrets if secret for spelling in (secret, secret.replace("/", "\\/"))
        }
        self._spellings = sorted(spellings, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._spellings:
            value = value.replace(secret, REDACTED)
        return value

    def bytes(self, value: bytes) -> bytes:
        for secret in self._spellings:
            value = value.replace(secret.encode(), REDACTED.encode())
        return value


class ReplyTooLarge(Exception):
    pass


class BoundedBody:
    """A reply body read chunk by chunk, inflated (gzip, deflate) with a bound on both sizes.

    httpx inflates without a bound, so a 0.5 MB gzip reply can become 512 MiB in memory; here
    ``zlib``'s ``max_length`` stops inflating one byte past the limit."""

    def __init__(self, encoding: str, limit: int):
        self.limit = limit
        self.raw = 0
        self.parts: list[bytes] = []
        self.size = 0
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            self._inflater = None
        elif encoding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._inflater = zlib.decompressobj()
        else:
            raise ValueError(f"content-encoding {encoding!r} was not asked for")

    def feed(self, chunk: bytes) -> None:
        self.raw += len(chunk)
        if self.raw > self.limit:
            raise ReplyTooLarge(f"reply larger than max_response_bytes={self.limit} as sent")
        if self._inflater is not None:
            chunk = self._inflater.decompress(chunk, self.limit - self.size + 1)
        self._keep(chunk)

    def finish(self) -> bytes:
        if self._inflater is not None:
            self._keep(self._inflater.flush())
        return b"".join(self.parts)

    def _keep(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise ReplyTooLarge(f"reply larger than max_response_bytes={self.limit} once inflated")
        self.parts.append(chunk)


@dataclass
class Reply:
    status_code: int
    headers: httpx.Headers
    body: bytes

    def text(self, limit: int) -> str:
        return self.body[:limit].decode("utf-8", "replace")


@dataclass
class ClientStats:
    """Counters of one client: HTTP requests, retries by reason, requests in flight over time."""

    requests: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    peak_in_flight: int = 0
    timeline: list[tuple[float, int]] | None = None  # (monotonic s, in flight) at each change, if asked

    def _change(self, delta: int) -> None:
        self.in_flight += delta
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if self.timeline is not None:
            self.timeline.append((time.monotonic(), self.in_flight))


class ChatClient:
    """POST /chat/completions with retries; ``async with ChatClient(...) as client``."""

    def __init__(self, base_url: str, config: ClientSettings, track_timeline: bool = False):
        self.base_url = normalize_base_url(base_url)
        self.server = redact_url(self.base_url)
        self.config = config
        self.stats = ClientStats(timeline=[] if track_timeline else None)
        self._http: httpx.AsyncClient | None = None
        self._api_key = os.environ.get(config.api_key_env) or None
        self.redactor = Redactor([self._api_key] if self._api_key else [])
        self._rate = RateLimit(config.max_requests_per_second) if config.max_requests_per_second else None

    async def __aenter__(self) -> ChatClient:
        headers = {"Accept-Encoding": ACCEPTED_ENCODINGS}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        limit = self.config.concurrency
        self._http = httpx.AsyncClient(
            base_url=self.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(self.config.timeout_s, connect=self.config.connect_timeout_s),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def complete(self, payload: dict) -> tuple[dict, int]:
        """The completion body and the number of HTTP requests it took; raises ``RequestFailure``
        whose message holds no secret."""
        config = self.config
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self._post_once(payload), attempts
            except _Retryable as err:
                if attempts > config.max_retries:
                    message = self.redactor.text(f"{err} (after {attempts} attempts)")
                    raise RequestFailure(err.reason, message, attempts) from None
                self.stats.retries[err.reason] = self.stats.retries.get(err.reason, 0) + 1
                delay = min(config.backoff_max_s, config.backoff_s * 2 ** (attempts - 1))
                delay *= 0.5 + random.random() / 2  # jitter, so retries of a burst spread out
                if err.retry_after is not None:
                    delay = max(delay, min(err.retry_after, config.backoff_max_s))
                await asyncio.sleep(delay)
            except RequestFailure as err:
                raise RequestFailure(err.reason, self.redactor.text(str(err)), attempts) from None

    async def _post_once(self, payload: dict) -> dict:
        if self._rate is not None:
            await self._rate.wait_async()
        self.stats.requests += 1
        self.stats._change(+1)
        try:
            async with asyncio.timeout(self.config.deadline_s):
                reply = await self._exchange(payload)
        except TimeoutError:
            raise _Retryable(
                "timeout", f"no complete reply from {self.server} within deadline_s={self.config.deadline_s}"
            ) from None
        except httpx.TimeoutException as err:
            raise _Retryable("timeout", f"{type(err).__name__} from {self.server}") from None
        except (httpx.DecodingError, zlib.error) as err:  # a body that does not inflate
            raise _Retryable("malformed_response", f"undecodable body from {self.server}: {err}") from None
        except (ReplyTooLarge, ValueError) as err:  # another try would bring the same bytes
            raise RequestFailure("malformed_response", f"{err} from {self.server}", 0) from None
        except httpx.RequestError as err:  # connect, read, write and protocol errors
            raise _Retryable("connection_error", f"{type(err).__name__} from {self.server}: {err}") from None
        finally:
            self.stats._change(-1)
        if reply.status_code == 429:
            raise _Retryable("rate_limited", "HTTP 429", _retry_after(reply.headers))
        if reply.status_code >= 500:
            raise _Retryable("server_error", f"HTTP {reply.status_code}: {reply.text(200)}")
        if reply.status_code >= 400:
            raise RequestFailure("client_error", f"HTTP {reply.status_code}: {reply.text(300)}", 0)
        try:
            body = json.loads(reply.body)
            content = body["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise _Retryable(
                "malformed_response", f"not a chat completion ({err}): {reply.text(120)!r}"
            ) from None
        return body

    async def _exchange(self, payload: dict) -> Reply:
        """One POST, its body read within ``max_response_bytes`` and stripped of secrets."""
        async with self._http.stream("POST", "chat/completions", json=payload) as response:
            limit = self.config.max_response_bytes
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ReplyTooLarge(f"reply of {declared} bytes, over max_response_bytes={limit}")
            body = BoundedBody(response.headers.get("content-encoding", ""), limit)
            async for chunk in response.aiter_raw():
                body.feed(chunk)
            return Reply(response.status_code, response.headers, self.redactor.bytes(body.finish()))


def _retry_after(headers: httpx.Headers) -> float | None:
    """``Retry-After`` in seconds when it is a sane number (a date or ``inf`` is ignored)."""
    try:
        seconds = float(headers["retry-after"])
    except (KeyError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@dataclass
class Answer:
    caption: str
    attributes: FaceAttributes | None
    provenance: Provenance

    def to_cache(self) -> dict:
        return {
            "caption": self.caption,
            "attributes": None if self.attributes is None else self.attributes.model_dump(mode="json"),
            "provenance": self.provenance.model_dump(mode="json"),
        }

    @classmethod
    def from_cache(cls, value: object) -> Answer:
        """A cached answer, validated again as when it arrived (a cache file is outside data: an
        older version's, or hand-edited); raises ``ValueError`` for one that would not pass now."""
        if not isinstance(value, dict) or not isinstance(value.get("caption"), str) or not value["caption"]:
            raise ValueError("a cached answer without a caption")
        attributes = value.get("attributes")
        return cls(
            caption=value["caption"],
            attributes=None if attributes is None else FaceAttributes.model_validate(attributes),
            provenance=Provenance.model_validate(value.get("provenance")),
        )


@dataclass
class Outcome:
    """One face's result: ``status`` 'success' with an ``answer``, or a failure reason and error."""

    key: str
    status: str
    answer: Answer | None = None
    error: str | None = None
    attempts: int = 0
    latency_s: float | None = None
    cached: bool = False


class InvalidAnswer(ValueError):
    pass


def clean_caption(text: str) -> str:
    return " ".join(CONTROL_CHARS.sub(" ", text).split())


def parse_answer(content: str, caption_max_chars: int) -> FaceResponse:
    """The model's message content as a validated ``FaceResponse``; raises ``InvalidAnswer``."""
    text = FENCE.sub("", content.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise InvalidAnswer("the answer holds no JSON object")
    try:
        data = json.loads(text[start : end + 1], strict=False)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than json's stack
        raise InvalidAnswer(f"invalid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("caption"), str):
        data["caption"] = clean_caption(data["caption"])
    try:
        response = FaceResponse.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise InvalidAnswer(f"does not match the schema: {problems}") from None
    if len(response.caption) > caption_max_chars:
        raise InvalidAnswer(f"caption longer than {caption_max_chars} characters")
    return response


def image_data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class MLLMAnnotator:
    """Annotates one face crop per call over a ``ChatClient``; holds the prompt and the schema."""

    annotator_kind = "mllm"

    def __init__(self, config: AnnotateConfig, prompt: Prompt | None = None):
        self.config = config
        self.prompt = prompt or load_prompt(config.prompt)
        self.model = config.request_model
        self.schema = response_schema(config.caption_max_chars)
        self.schema_sha256 = hashlib.sha256(json.dumps(self.schema, sort_keys=True).encode()).hexdigest()
        self.sampling: dict[str, Any] = {
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_tokens": config.max_tokens,
            "seed": config.seed,
        }
        self.user_text = self.prompt.user_text(config.caption_max_chars)

    def cache_key(self, image: bytes) -> str:
        return request_key(
            image_sha256=hashlib.sha256(image).hexdigest(),
            prompt_version=self.prompt.version,
            prompt_sha256=self.prompt.sha256,
            model=self.model,
            sampling=self.sampling,
            structured_output=self.config.structured_output,
            schema_sha256=self.schema_sha256,
        )

    def messages(self, image: bytes) -> list[dict]:
        return [
            {"role": "system", "content": self.prompt.system},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                    {"type": "text", "text": self.user_text},
                ],
            },
        ]

    def payload(self, messages: list[dict]) -> dict:
        payload: dict[str, Any] = {"model": self.model, "messages": messages, **self.sampling}
        if payload["seed"] is None:
            del payload["seed"]
        if self.config.structured_output == "json_schema":
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "face_annotation", "schema": self.schema, "strict": True},
            }
        return payload

    async def annotate(self, client: ChatClient, key: str, image: bytes) -> Outcome:
        started = time.monotonic()
        messages = self.messages(image)
        usage = TokenUsage()
        attempts = 0
        repaired = False
        contents: list[str] = []
        try:
            body, used = await client.complete(self.payload(messages))
            attempts += used
            _add_usage(usage, body)
            content = body["choices"][0]["message"]["content"]
            contents.append(content)
            try:
                response = parse_answer(content, self.config.caption_max_chars)
            except InvalidAnswer as first:
                if not self.config.repair:
                    raise
                repair = [
                    *messages,
                    {"role": "assistant", "content": content[:4000]},
                    {"role": "user", "content": self.prompt.repair_text(str(first))},
                ]
                body, used = await client.complete(self.payload(repair))
                attempts += used
                _add_usage(usage, body)
                content = body["choices"][0]["message"]["content"]
                contents.append(content)
                response = parse_answer(content, self.config.caption_max_chars)
                repaired = True
        except RequestFailure as err:
            return Outcome(
                key, err.reason, error=str(err), attempts=attempts + err.attempts, latency_s=_since(started)
            )
        except InvalidAnswer as err:
            return Outcome(
                key, "invalid_output", error=str(err), attempts=attempts, latency_s=_since(started)
            )
        except Exception as err:  # a bug or an odd server must not stop the shard: record it
            error = client.redactor.text(f"unexpected {type(err).__name__}: {err}")
            return Outcome(key, "client_error", error=error, attempts=attempts, latency_s=_since(started))
        latency = _since(started)
        provenance = Provenance(
            annotator="mllm",
            model=self.model,
            prompt_version=self.prompt.version,
            prompt_sha256=self.prompt.sha256,
            sampling=self.sampling,
            server=client.server,
            latency_s=latency,
            attempts=attempts,
            repaired=repaired,
            usage=usage,
            raw_response_sha256=hashlib.sha256(contents[-1].encode()).hexdigest(),
        )
        answer = Answer(response.caption, response.attributes, provenance)
        return Outcome(key, "success", answer=answer, attempts=attempts, latency_s=latency)


def _add_usage(usage: TokenUsage, body: dict) -> None:
    """Add a reply's token counts; a count that is not an int in ``[0, MAX_USAGE_TOKENS]`` is no
    usage a server can have had, and is ignored rather than summed into counters and tables."""
    got = body.get("usage")
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = got.get(name) if isinstance(got, dict) else None
        if type(value) is int and 0 <= value <= MAX_USAGE_TOKENS:
            setattr(usage, name, min(MAX_USAGE_TOKENS, getattr(usage, name) + value))


def _since(started: float) -> float:
    return round(time.monotonic() - started, 4)
