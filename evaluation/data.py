"""The evaluated data, read through manifests only, so a half-written output is never scored.

``--data`` may name:

- a reformat output, ``OUT/qa`` (or ``OUT``): one ``<dataset>/manifest.json`` per finished dataset
  (the reformat stage's commit point), shard urls relative to the dataset's folder;
- a published dataset (``facemllm publish``), e.g. ``s3://bucket/run``: its current
  ``manifest.json`` lists the ``qa/<dataset>/<split>`` stages, shard urls relative to it (after a
  removal, the new version's shards).

The data hash in every result covers the manifests' bytes and the sample selection, so results are
compared only when they scored the same samples. Local folders and object-store URLs read alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

from facemllm.pipeline.core.shards import iter_tar_url
from facemllm.pipeline.core.storage import Storage, StorageOptions
from facemllm.schemas import (
    PublishedManifest,
    QASample,
    RunManifest,
    ShardManifest,
    SourceDataset,
    read_qa_samples,
)


@dataclass(frozen=True)
class ShardRef:
    dataset: SourceDataset
    split: str
    rel: str  # relative to the data folder: celeba/test/00000.tar
    nsamples: int


@dataclass(frozen=True)
class QAItem:
    sample: QASample
    image: bytes
    shard: ShardRef


class EvalData:
    """The QA stages (``qa/<dataset>/<split>``) under one data folder or published prefix."""

    def __init__(self, root: str, storage: StorageOptions | None = None):
        self.root = root.rstrip("/")
        self.options = storage or StorageOptions(progress=False)
        self.storage = Storage(self.root, self.options)
        self.stages: dict[str, tuple[ShardManifest, str]] = {}  # stage -> (its manifest, url prefix)
        self.manifest_sha256: dict[str, str] = {}  # dataset -> sha256 of the manifest listing it
        if not self._read_published():
            self._read_reformat_outputs()

    def _read(self, rel: str) -> tuple[str, bytes] | None:
        if not self.storage.exists(rel):
            return None
        raw = self.storage.read_bytes(rel)
        return hashlib.sha256(raw).hexdigest(), raw

    def _read_published(self) -> bool:
        found = self._read("manifest.json")
        if found is None:
            return False
        digest, raw = found
        stages = PublishedManifest.model_validate_json(raw).stages
        for name, stage in stages.items():
            if name.startswith("qa/") and name.count("/") == 2:
                self.stages[name] = (stage, "")
                self.manifest_sha256[name.split("/")[1]] = digest
        return bool(self.stages)

    def _read_reformat_outputs(self) -> None:
        for dataset in get_args(SourceDataset):
            for folder in (dataset, f"qa/{dataset}"):
                found = self._read(f"{folder}/manifest.json")
                if found is None:
                    continue
                digest, raw = found
                for name, stage in RunManifest.model_validate_json(raw).stages.items():
                    if name.startswith(f"qa/{dataset}/"):
                        self.stages[name] = (stage, f"{folder}/")
                self.manifest_sha256[dataset] = digest
                break

    def has_split(self, dataset: SourceDataset, split: str) -> bool:
        return f"qa/{dataset}/{split}" in self.stages

    def shards(self, dataset: SourceDataset, split: str) -> list[ShardRef]:
        stage, prefix = self.stages.get(f"qa/{dataset}/{split}", (None, ""))
        if stage is None:
            return []
        return [ShardRef(dataset, split, prefix + info.url, info.nsamples) for info in stage.shards]

    def task_count(self, dataset: SourceDataset, split: str, qa_task: str) -> int:
        stage, _ = self.stages.get(f"qa/{dataset}/{split}", (None, ""))
        return 0 if stage is None else int(stage.counts.get(f"task_{qa_task}", 0))

    def items(self, shard: ShardRef) -> Iterator[QAItem]:
        for key, members in iter_tar_url(self.storage.url(shard.rel), self.options):
            if "json" not in members:
                raise ValueError(f"{shard.rel}: sample {key} has no .json member")
            image = next((members[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in members), None)
            if image is None:
                raise ValueError(f"{shard.rel}: sample {key} has no image member")
            for sample in read_qa_samples(members["json"]):  # each question is scored on its own
                yield QAItem(sample, image, shard)

    def data_hash(self, datasets: list[str], selection: dict) -> str:
        manifests = {d: self.manifest_sha256[d] for d in sorted(datasets)}
        payload = json.dumps({"manifests": manifests, "selection": selection}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
