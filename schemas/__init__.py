"""pydantic records: the contracts between facemllm stages."""

from schemas.export import export_json_schemas
from schemas.records import (
    ALL_RECORDS,
    SCHEMA_VERSION,
    CropGeometry,
    DownloadStatus,
    FaceDetection,
    FaceRecord,
    FaceStatus,
    LaionRow,
    RunManifest,
    ShardInfo,
    ShardManifest,
)

__all__ = [
    "ALL_RECORDS",
    "SCHEMA_VERSION",
    "CropGeometry",
    "DownloadStatus",
    "FaceDetection",
    "FaceRecord",
    "FaceStatus",
    "LaionRow",
    "RunManifest",
    "ShardInfo",
    "ShardManifest",
    "export_json_schemas",
]
