"""Classic face datasets in their native layouts -> QA samples (plain Python, no Beam).

One module per dataset (``celeba``, ``rafdb``, ``utkface``, ``fairface``) lists its inputs and
turns each accepted row into QA pairs with the shared builder (``qa``) and template banks
(``templates``); ``base`` does what they share.
"""

from __future__ import annotations

from pathlib import Path

from facemllm.reformatters.base import DatasetReformatter
from facemllm.reformatters.celeba import CelebAReformatter
from facemllm.reformatters.config import QAConfig
from facemllm.reformatters.fairface import FairFaceReformatter
from facemllm.reformatters.rafdb import RAFDBReformatter
from facemllm.reformatters.utkface import UTKFaceReformatter
from facemllm.schemas import SourceDataset

REFORMATTERS: dict[SourceDataset, type[DatasetReformatter]] = {
    "celeba": CelebAReformatter,
    "rafdb": RAFDBReformatter,
    "utkface": UTKFaceReformatter,
    "fairface": FairFaceReformatter,
}


def make_reformatter(dataset: SourceDataset, root: str | Path, config: QAConfig) -> DatasetReformatter:
    """The dataset's reformatter; raises FileNotFoundError naming what the root lacks."""
    return REFORMATTERS[dataset](Path(root), config)


__all__ = ["REFORMATTERS", "DatasetReformatter", "QAConfig", "make_reformatter"]
