"""The evaluated data: finished reformat outputs (``OUT/qa/<dataset>/``), read through their manifests.

Only a dataset whose ``manifest.json`` exists is evaluated (the manifest is the reformat stage's
commit point), and its shards are the ones the manifest lists, so a half-written output is never
scored. The data hash in every result covers the manifests' bytes and the sample selection, so
results are compared only when they scored the same samples. Local folders and object-store URLs
(``s3://``) read the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.storage import Storage, StorageOptions, iter_tar_stream
from schemas import QASample, RunManifest, SourceDataset


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
    """Manifests, shards and samples of the datasets under one data folder (``OUT/qa``)."""

    def __init__(self, root: str, storage: StorageOptions | None = None):
        self.root = root.rstrip("/")
        self.options = storage or StorageOptions(progress=False)
        self.storage = Storage(self.root, self.options)
        self._manifests: dict[str, tuple[str, RunManifest] | None] = {}

    def manifest(self, dataset: SourceDataset) -> tuple[str, RunManifest] | None:
        """The dataset's manifest and the sha256 of its bytes, or None when there is no finished output."""
        if dataset not in self._manifests:
            rel = f"{dataset}/manifest.json"
            if not self.storage.exists(rel):
                self._manifests[dataset] = None
            else:
                raw = self.storage.read_bytes(rel)
                self._manifests[dataset] = (
                    hashlib.sha256(raw).hexdigest(),
                    RunManifest.model_validate_json(raw),
                )
        return self._manifests[dataset]

    def has_split(self, dataset: SourceDataset, split: str) -> bool:
        found = self.manifest(dataset)
        return found is not None and f"qa/{dataset}/{split}" in found[1].stages

    def shards(self, dataset: SourceDataset, split: str) -> list[ShardRef]:
        found = self.manifest(dataset)
        stage = None if found is None else found[1].stages.get(f"qa/{dataset}/{split}")
        if stage is None:
            return []
        return [ShardRef(dataset, split, f"{dataset}/{info.url}", info.nsamples) for info in stage.shards]

    def task_count(self, dataset: SourceDataset, split: str, qa_task: str) -> int:
        found = self.manifest(dataset)
        stage = None if found is None else found[1].stages.get(f"qa/{dataset}/{split}")
        return 0 if stage is None else int(stage.counts.get(f"task_{qa_task}", 0))

    def items(self, shard: ShardRef) -> Iterator[QAItem]:
        for key, members in iter_tar_stream(self.storage.url(shard.rel), self.options):
            if "json" not in members:
                raise ValueError(f"{shard.rel}: sample {key} has no .json member")
            sample = QASample.model_validate_json(members["json"])
            image = next((members[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in members), None)
            if image is None:
                raise ValueError(f"{shard.rel}: sample {key} has no image member")
            yield QAItem(sample, image, shard)

    def data_hash(self, datasets: list[str], selection: dict) -> str:
        manifests = {d: self.manifest(d)[0] for d in sorted(datasets) if self.manifest(d) is not None}
        payload = json.dumps({"manifests": manifests, "selection": selection}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
