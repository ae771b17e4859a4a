"""WebDataset shards -> padded, answer-masked training batches, deterministic and resumable.

Each DataLoader worker of each rank runs one *stream*, identified by its slot
``rank * num_workers + worker`` out of ``world_size * num_workers``:

1. **sources**: every source is an infinite sequence of shard *draws*. Read in epochs (one source,
   ``resampled: false``), epoch ``e`` is a seeded permutation of the shard list, split between
   slots shard by shard (or sample by sample when there are fewer shards than slots). Resampled
   (mixtures), draw ``d`` picks a shard with replacement, seeded by (seed, source, slot, d). A
   source's position is (draw, samples taken from it): restoring it reopens one shard and skips.
2. **mixing**: the k-th sample of the stream comes from a source drawn with the configured weights,
   from blocks of choices seeded by (seed, slot, block): nothing depends on what was read before.
3. **segments** of ``segment_samples`` samples: a seeded shuffle buffer, the chat-template rendering
   and tokenisation (text only), then length-grouped batching in windows of ``group_by_length``
   batches. Every buffer drains at the end of a segment, so the stream's state at a segment start
   is just the sources' positions.
4. **collation**, for the batches that are actually delivered: images decoded (size-bounded) and
   run through the model's processor, the image placeholder spliced into its expansion, padding.

Each batch carries its position (segment, the sources' positions at its start, batches delivered
from it). The trainer keeps the last position per stream; resuming restores the sources and
replays that one segment without decoding images, then continues exactly where it stopped. The
DataLoader hands out batches round-robin over workers; on resume the workers are rotated by the
number of batches already consumed, so the order of batches is the same as without the break.

Samples are ``KEY.jpg`` (or png/webp) + ``KEY.json`` with LLaVA ``conversations``; the loss is on
the assistant turns only (labels -100 elsewhere). Bad samples and unreadable shards are skipped and
counted, never fatal.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from pydantic_core import from_json
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facemllm.pipeline.core.shards import ShardFormatError, UnsafeTarError, iter_tar_url
from facemllm.pipeline.core.storage import StorageOptions, filesystem_options, protocol_of
from facemllm.training.config import DataConfig
from facemllm.training.model import Family
from facemllm.training.templates import conversation_to_messages

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MIX_BLOCK = 1024
# seed streams of numpy's SeedSequence, so no two uses of the seed collide
_RESAMPLE, _EPOCH, _MIX, _SHUFFLE, _GROUP, _DROP = range(1, 7)


# --- shard lists --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    url: str
    nsamples: int | None = None


def _fs(url: str, storage: StorageOptions):
    import fsspec

    return fsspec.core.url_to_fs(url, **filesystem_options(protocol_of(url), storage))


def _listed(fs, path: str, listings: dict[str, set[str]]) -> bool:
    """Whether ``path`` exists, from one listing of its folder (not one request per shard)."""
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    if parent not in listings:
        try:
            listings[parent] = {entry.rstrip("/") for entry in fs.ls(parent, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            listings[parent] = set()
    return path.rstrip("/") in listings[parent] or fs.exists(path)


def read_sizes(payload: bytes) -> dict[str, int]:
    """``sizes.json`` (shard name -> samples) as open_clip writes it; entries that are not a
    non-negative whole count are left out (their shard then has no known size), anything that is
    not a JSON object is a ValueError."""
    document = from_json(payload)
    if not isinstance(document, dict):
        raise ValueError("sizes.json must be a JSON object")
    sizes = {}
    for name, value in document.items():
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is int and value >= 0:
            sizes[str(name)] = value
    return sizes


def expand_shards(urls: list[str], storage: StorageOptions) -> list[Shard]:
    """Shard URLs from ranges (``{00000..00009}``), globs, folders (every ``*.tar``) and plain URLs.

    Per-shard sample counts come from a ``sizes.json`` beside the shards when there is one.
    """
    found: list[str] = []
    listings: dict[str, set[str]] = {}
    for spec in urls:
        for url in braceexpand(spec):
            fs, path = _fs(url, storage)
            remote = protocol_of(url) not in ("file", "local")
            if re.search(r"[*?\[]", path):
                matches = sorted(fs.glob(path))
            elif not path.endswith((".tar", ".tgz", ".tar.gz")) and fs.isdir(path):
                matches = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
            else:
                matches = [path] if _listed(fs, path, listings) else []
                if not matches:
                    log.warning("shard %s does not exist; left out", url)
            found.extend(fs.unstrip_protocol(m) if remote else m for m in matches)
    found = list(dict.fromkeys(found))
    sizes: dict[str, dict[str, int]] = {}
    for parent in dict.fromkeys(url.rsplit("/", 1)[0] for url in found):
        fs, path = _fs(parent, storage)
        try:
            with fs.open(f"{path}/sizes.json", "rb") as handle:
                sizes[parent] = read_sizes(handle.read())
        except (FileNotFoundError, ValueError, OSError):
            sizes[parent] = {}
    return [Shard(url, sizes[url.rsplit("/", 1)[0]].get(url.rsplit("/", 1)[1])) for url in found]


# --- sources and mixing -------------------------------------------------------------------------


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]
    source: int


class SourceStream:
    """One source's infinite sample sequence for one slot; ``position`` is (draw, samples taken)."""

    def __init__(
        self,
        index: int,
        shards: list[Shard],
        seed: int,
        slot: int,
        nslots: int,
        resampled: bool,
        storage: StorageOptions,
        counters: Counter,
    ):
        if not shards:
            raise ValueError(f"source {index} has no shards")
        self.index, self.shards, self.seed = index, shards, seed
        self.slot, self.nslots, self.resampled = slot, nslots, resampled
        self.storage, self.counters = storage, counters
        self.split_samples = not resampled and len(shards) < nslots
        self.position: tuple[int, int] = (0, 0)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, _EPOCH, self.index, epoch])
            self._perm_cache = (epoch, rng.permutation(len(self.shards)))
        return self._perm_cache[1]

    def draw(self, d: int) -> Shard:
        if self.resampled:
            rng = np.random.default_rng([self.seed, _RESAMPLE, self.index, self.slot, d])
            return self.shards[int(rng.integers(len(self.shards)))]
        if self.split_samples:
            epoch, i = divmod(d, len(self.shards))
            return self.shards[self._permutation(epoch)[i]]
        per_epoch = len(range(self.slot, len(self.shards), self.nslots))
        epoch, i = divmod(d, per_epoch)
        return self.shards[self._permutation(epoch)[self.slot + i * self.nslots]]

    def __iter__(self) -> Iterator[RawSample]:
        d, skip = self.position
        barren = 0  # consecutive draws that gave nothing new
        while True:
            shard = self.draw(d)
            taken = 0
            try:
                for k, (key, members) in enumerate(iter_tar_url(shard.url, self.storage)):
                    if self.split_samples and k % self.nslots != self.slot:
                        continue
                    taken += 1
                    if taken <= skip:
                        continue
                    self.position = (d, taken)
                    barren = 0
                    yield RawSample(key, members, self.index)
            except (OSError, tarfile.TarError, UnsafeTarError, ShardFormatError, EOFError) as err:
                self.counters["bad_shard"] += 1
                log.warning("skipping the rest of shard %s: %s: %s", shard.url, type(err).__name__, err)
            barren = barren + 1 if taken <= skip else 0
            if barren > 2 * len(self.shards) + 8:
                raise RuntimeError(
                    f"source {self.index}: {barren} shards in a row gave no sample (last: {shard.url})"
                )
            d, skip = d + 1, 0
            self.position = (d, 0)


class Mixer:
    """Which source the k-th sample of a stream comes from: seeded per block, random access."""

    def __init__(self, weights: list[float], seed: int, slot: int):
        total = sum(weights)
        self.p = np.array([w / total for w in weights])
        self.seed, self.slot = seed, slot
        self._block: tuple[int, np.ndarray] | None = None

    def __call__(self, k: int) -> int:
        if len(self.p) == 1:
            return 0
        block, i = divmod(k, MIX_BLOCK)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, _MIX, self.slot, block])
            self._block = (block, rng.choice(len(self.p), size=MIX_BLOCK, p=self.p))
        return int(self._block[1][i])


def shuffle_buffer(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A bounded shuffle (WebDataset's ``shuffle``), drained at the end of ``items``."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        buffer[i], item = item, buffer[i]
        yield item
    order = rng.permutation(len(buffer))
    for i in order:
        yield buffer[i]


# --- rendering, tokenisation, answer masking ----------------------------------------------------


@dataclass
class Item:
    """A sample after text processing: the image stays encoded until its batch is delivered."""

    key: str
    source: int
    input_ids: np.ndarray  # int64, the image placeholder as one token
    label_mask: np.ndarray  # bool, True on answer tokens
    image: bytes | None
    est_length: int


class SkipSample(ValueError):
    """A sample that cannot be trained on; the reason names its counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


class ConversationEncoder:
    """Renders conversations with the model's chat template; labels only the assistant turns.

    Each assistant turn's character span is found by rendering the conversation up to it (with the
    generation prompt) and through it; tokens whose offsets fall inside a span are labelled. The
    template must be prefix-stable (rendering a conversation's first turns gives a prefix of the
    whole), which every chat template in use is; a template that is not is reported, not guessed.
    """

    def __init__(self, processor, max_length: int, image_tokens_estimate: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
        if not template:
            raise ValueError("the processor has no chat template: set model.chat_template")
        self.template = template
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.max_length = max_length
        self.image_tokens_estimate = image_tokens_estimate

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_messages(self, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, str]:
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[: i + 1])
            if not (text.startswith(prefix) and text.startswith(through)):
                raise SkipSample("template_not_prefix_stable", "the chat template is not prefix-stable")
            spans.append((len(prefix), len(through)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for t, (start, end) in enumerate(encoded["offset_mapping"]):
            if end > start:
                mask[t] = any(s <= start and end <= e for s, e in spans)
        return ids, mask, text

    def encode(self, raw: RawSample) -> Item:
        members = raw.members
        if "json" not in members:
            raise SkipSample("no_json")
        try:
            record = json.loads(members["json"])
            conversations = record["conversations"]
            messages, n_images = conversation_to_messages(conversations)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SkipSample("bad_conversation", str(err)) from None
        image = next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
        if image is not None and n_images == 0:  # LLaVA convention: the image leads the first turn
            first = next(m for m in messages if m["role"] == "user")
            content = first["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            first["content"] = [{"type": "image"}, *parts]
            n_images = 1
        if n_images > 1:
            raise SkipSample("several_images")
        if n_images == 1 and image is None:
            raise SkipSample("missing_image")
        ids, mask, _ = self.encode_messages(messages)
        if n_images and int((ids == self.image_token_id).sum()) != 1:
            raise SkipSample("image_placeholder", "the rendered text does not hold exactly one image token")
        if not mask.any():
            raise SkipSample("no_answer_tokens")
        est = len(ids) + n_images * (self.image_tokens_estimate - 1)
        if est > self.max_length:
            raise SkipSample("too_long")
        return Item(raw.key, raw.source, ids, mask, image, est)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > max_pixels:
            raise SkipSample("image_too_large", f"{image.width}x{image.height}")
        image.load()
        return image.convert("RGB")


# --- collation ----------------------------------------------------------------------------------


class Collator:
    """Items -> model inputs: images processed in one call, placeholders spliced, right padding."""

    def __init__(self, processor, family: Family, data: DataConfig, encoder: ConversationEncoder):
        self.processor = processor
        self.family = family
        self.max_length = data.max_length
        self.multiple = data.pad_to_multiple_of
        self.max_pixels = data.max_image_pixels
        self.encoder = encoder
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def expansions(self, images: list[Image.Image]) -> tuple[list[np.ndarray], dict[str, torch.Tensor]]:
        """Each image's token expansion and the processor's image tensors (one call per batch)."""
        nested = [[image] for image in images] if self.family.image_layout == "per_sample" else images
        out = self.processor(
            text=[self.encoder.image_token] * len(images),
            images=nested,
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
        ids, attention = out.pop("input_ids"), out.pop("attention_mask")
        expansions = [row[mask.bool()].numpy() for row, mask in zip(ids, attention, strict=True)]
        return expansions, dict(out)

    def __call__(self, items: list[Item], counters: Counter) -> dict[str, Any] | None:
        decoded: list[tuple[Item, Image.Image | None]] = []
        for item in items:
            try:
                decoded.append(
                    (item, None if item.image is None else decode_image(item.image, self.max_pixels))
                )
            except SkipSample as err:
                counters[err.reason] += 1
            except Exception:  # PIL raises many kinds for garbage bytes
                counters["bad_image"] += 1
        images = [image for _, image in decoded if image is not None]
        expansions, image_inputs = self.expansions(images) if images else ([], {})
        rows = []
        e = 0
        for item, image in decoded:
            ids, mask = item.input_ids, item.label_mask
            if image is not None:
                expansion = expansions[e]
                e += 1
                at = int(np.flatnonzero(ids == self.encoder.image_token_id)[0])
                ids = np.concatenate([ids[:at], expansion, ids[at + 1 :]])
                mask = np.concatenate([mask[:at], np.zeros(len(expansion), bool), mask[at + 1 :]])
            rows.append((item, ids, mask, image is not None))
        kept = [r for r in rows if len(r[1]) <= self.max_length]
        counters["too_long"] += len(rows) - len(kept)
        if not kept:
            return None
        if len(kept) < len(rows) and images:  # drop the image tensors of dropped rows
            image_inputs = self._select_images(image_inputs, [r[3] for r in rows], [r in kept for r in rows])
        width = max(len(r[1]) for r in kept)
        width = -(-width // self.multiple) * self.multiple
        input_ids = torch.full((len(kept), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(kept), width), -100, dtype=torch.long)
        attention = torch.zeros((len(kept), width), dtype=torch.long)
        for b, (_, ids, mask, _) in enumerate(kept):
            n = len(ids)
            input_ids[b, :n] = torch.from_numpy(ids)
            attention[b, :n] = 1
            labels[b, :n] = torch.from_numpy(np.where(mask, ids, -100))
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if images:
            batch.update(self._layout(image_inputs, [r[3] for r in kept]))
        batch["meta"] = {
            "keys": [r[0].key for r in kept],
            "sources": [r[0].source for r in kept],
            "n_samples": len(kept),
            "n_tokens": int(attention.sum()),
            "n_label_tokens": int((labels[:, 1:] != -100).sum()),
        }
        return batch

    def _select_images(self, inputs: dict[str, torch.Tensor], has_image: list[bool], keep: list[bool]):
        chosen = [k for h, k in zip(has_image, keep, strict=True) if h]
        index = torch.tensor([i for i, k in enumerate(chosen) if k], dtype=torch.long)
        return {name: value.index_select(0, index) for name, value in inputs.items()}

    def _layout(self, inputs: dict[str, torch.Tensor], has_image: list[bool]) -> dict[str, torch.Tensor]:
        if self.family.image_layout == "flat" or all(has_image):
            return inputs
        rows = torch.tensor([i for i, h in enumerate(has_image) if h], dtype=torch.long)
        laid = {}
        for name, value in inputs.items():  # rows without an image get zeros (the model drops them)
            full = torch.zeros((len(has_image), *value.shape[1:]), dtype=value.dtype)
            full[rows] = value
            laid[name] = full
        return laid


# --- one stream ---------------------------------------------------------------------------------


def length_batches(
    items: Iterator[Item], batch_size: int, window_batches: int, rng: np.random.Generator, counters: Counter
) -> Iterator[list[Item]]:
    """Batches of ``batch_size`` from windows of ``window_batches`` batches sorted by length; the order
    of batches within a window is shuffled. At the end, a remainder short of a batch is dropped
    (chosen at random, so no length is favoured)."""
    window: list[Item] = []

    def flush(final: bool) -> Iterator[list[Item]]:
        nonlocal window
        if final and len(window) % batch_size:
            keep = len(window) - len(window) % batch_size
            counters["dropped_at_segment_end"] += len(window) - keep
            chosen = np.sort(rng.permutation(len(window))[:keep])
            window = [window[i] for i in chosen]
        if window_batches > 1:
            window.sort(key=lambda item: item.est_length)
        batches = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        window = []
        for i in rng.permutation(len(batches)) if window_batches > 1 else range(len(batches)):
            yield batches[i]

    for item in items:
        window.append(item)
        if len(window) == batch_size * window_batches:
            yield from flush(final=False)
    yield from flush(final=True)


@dataclass
class StreamSpec:
    sources: list[list[Shard]]
    weights: list[float]
    data: DataConfig
    seed: int
    slot: int
    nslots: int


@dataclass
class WorkerStream:
    """One slot's batches, from a position (or the start), forever."""

    spec: StreamSpec
    encoder: ConversationEncoder
    collator: Collator
    start: dict[str, Any] | None = None
    counters: Counter = field(default_factory=Counter)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec, data = self.spec, self.spec.data
        sources = [
            SourceStream(
                i, shards, spec.seed, spec.slot, spec.nslots, data.is_resampled, data.storage, self.counters
            )
            for i, shards in enumerate(spec.sources)
        ]
        segment, skip = 0, 0
        if self.start:
            segment, skip = int(self.start["segment"]), int(self.start["batch"])
            for source, position in zip(sources, self.start["sources"], strict=True):
                source.position = (int(position[0]), int(position[1]))
        iterators = [iter(source) for source in sources]
        mixer = Mixer(spec.weights, spec.seed, spec.slot)
        size = data.segment_samples
        while True:
            at_start = {"segment": segment, "sources": [list(s.position) for s in sources]}
            raw = (next(iterators[mixer(segment * size + i)]) for i in range(size))
            shuffled = shuffle_buffer(
                raw, data.shuffle_buffer, np.random.default_rng([spec.seed, _SHUFFLE, spec.slot, segment])
            )
            items = self._encoded(shuffled)
            group_rng = np.random.default_rng([spec.seed, _GROUP, spec.slot, segment])
            batches = length_batches(items, data.batch_size, data.group_by_length, group_rng, self.counters)
            for b, batch_items in enumerate(batches):
                if b < skip:
                    continue
                batch = self.collator(batch_items, self.counters)
                if batch is None:
                    continue
                batch["position"] = {**at_start, "batch": b + 1}
                batch["meta"]["skipped"] = dict(self.counters)
                yield batch
            segment, skip = segment + 1, 0

    def _encoded(self, raws: Iterator[RawSample]) -> Iterator[Item]:
        for raw in raws:
            try:
                yield self.encoder.encode(raw)
            except SkipSample as err:
                self.counters[err.reason] += 1


# --- the dataset the trainer iterates -----------------------------------------------------------


def image_tokens_estimate(processor, family: Family) -> int:
    """Tokens one image expands to (for a small image; used only to sort by length)."""
    image = Image.new("RGB", (64, 64), (127, 127, 127))
    images = [[image]] if family.image_layout == "per_sample" else [image]
    token = getattr(processor, "image_token", "<image>")
    out = processor(text=[token], images=images, add_special_tokens=False)
    return len(out["input_ids"][0])


class ShardBatches(IterableDataset):
    """Per rank: one ``WorkerStream`` per DataLoader worker, rotated to resume in batch order.

    ``state`` is what ``DataState.to_json`` saved: batches consumed on this rank and the last
    position delivered by each stream.
    """

    def __init__(
        self,
        data: DataConfig,
        sources: list[list[Shard]],
        processor,
        family: Family,
        seed: int,
        rank: int,
        world_size: int,
        state: DataState | None = None,
    ):
        super().__init__()
        self.data, self.sources, self.processor, self.family = data, sources, processor, family
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_streams = max(data.num_workers, 1)
        self.state = state or DataState(num_streams=self.num_streams, world_size=world_size)
        self.state.check(self.num_streams, world_size)
        self.encoder = ConversationEncoder(
            processor, data.max_length, image_tokens_estimate(processor, family)
        )
        self.collator = Collator(processor, family, data, self.encoder)

    def stream(self, logical: int) -> WorkerStream:
        spec = StreamSpec(
            sources=self.sources,
            weights=[s.weight for s in self.data.sources],
            data=self.data,
            seed=self.seed,
            slot=self.rank * self.num_streams + logical,
            nslots=self.world_size * self.num_streams,
        )
        return WorkerStream(spec, self.encoder, self.collator, self.state.positions.get(logical))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        logical = (worker + self.state.consumed) % self.num_streams
        for batch in self.stream(logical):
            batch["stream"] = logical
            yield batch


@dataclass
class DataState:
    """Where one rank's data stands: batches consumed, and the last position of each stream."""

    num_streams: int
    world_size: int
    consumed: int = 0
    positions: dict[int, dict[str, Any]] = field(default_factory=dict)

    def update(self, batch: dict[str, Any]) -> None:
        self.consumed += 1
        self.positions[int(batch["stream"])] = batch["position"]

    def check(self, num_streams: int, world_size: int) -> None:
        if (num_streams, world_size) != (self.num_streams, self.world_size):
            raise ValueError(
                f"the checkpoint's data position is for {self.world_size} rank(s) x {self.num_streams} "
                f"stream(s), this run has {world_size} x {num_streams}: resume with the same world size "
                "and data.num_workers, or start a new output_dir"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "num_streams": self.num_streams,
            "world_size": self.world_size,
            "consumed": self.consumed,
            "positions": {str(k): v for k, v in self.positions.items()},
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> DataState:
        return cls(
            num_streams=int(payload["num_streams"]),
            world_size=int(payload["world_size"]),
            consumed=int(payload["consumed"]),
            positions={int(k): v for k, v in payload["positions"].items()},
        )


def make_loader(dataset: ShardBatches, pin_memory: bool) -> DataLoader:
    workers = dataset.data.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=dataset.data.prefetch_factor if workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def resolve_sources(data: DataConfig) -> list[list[Shard]]:
    sources = []
    for source in data.sources:
        shards = expand_shards(source.urls, data.storage)
        if not shards:
            raise FileNotFoundError(f"data source {source.name!r}: no shards match {source.urls}")
        sources.append(shards)
    return sources


def total_samples(shards: list[Shard]) -> int:
    missing = [s.url for s in shards if s.nsamples is None]
    if missing:
        raise ValueError(
            f"loop.epochs needs per-shard counts (sizes.json beside the shards); none for {Path(missing[0]).name}"
        )
    return sum(s.nsamples for s in shards)
