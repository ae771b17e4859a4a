"""pydantic records: the contracts between facemllm stages."""

from facemllm.schemas.annotation import ANNOTATION_RECORDS, AnnotationStatus, FaceAnnotation, FaceAttributes
from facemllm.schemas.export import export_json_schemas
from facemllm.schemas.qa import (
    QA_RECORDS,
    AnswerStyle,
    QALabel,
    QASample,
    QATask,
    ReformatStatus,
    SourceDataset,
    Turn,
)
from facemllm.schemas.records import (
    ALL_RECORDS,
    SCHEMA_VERSION,
    CropGeometry,
    DownloadStatus,
    FaceDetection,
    FaceRecord,
    FaceStatus,
    LaionRow,
    PublishedManifest,
    RemovalSummary,
    RunManifest,
    ShardInfo,
    ShardManifest,
)

__all__ = [
    "ALL_RECORDS",
    "ANNOTATION_RECORDS",
    "QA_RECORDS",
    "SCHEMA_VERSION",
    "AnnotationStatus",
    "AnswerStyle",
    "CropGeometry",
    "DownloadStatus",
    "FaceAnnotation",
    "FaceAttributes",
    "FaceDetection",
    "FaceRecord",
    "FaceStatus",
    "LaionRow",
    "PublishedManifest",
    "QALabel",
    "QASample",
    "QATask",
    "ReformatStatus",
    "RemovalSummary",
    "RunManifest",
    "ShardInfo",
    "ShardManifest",
    "SourceDataset",
    "Turn",
    "export_json_schemas",
]
