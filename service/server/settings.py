"""Server settings: command-line flags over ``SEQSERVE_*`` environment variables over defaults.

One pydantic-settings model is the single source of truth: ``service/commands.py`` derives the
``seqserve serve`` flags from these fields (flag ``--max-batch-texts`` for field
``max_batch_texts``, env ``SEQSERVE_MAX_BATCH_TEXTS``), and the server logs every value with
its source at start-up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import defaults

ENV_PREFIX = "SEQSERVE_"
KIB = 1 << 10
MIB = 1 << 20
# Settings whose values are secrets: the start-up log says only whether they are set.
SECRET_FIELDS = frozenset({"auth_tokens"})
_SERVICE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ShadowRule(BaseModel):
    """Mirror ``fraction`` of ``primary``'s requests to ``shadow`` and compare their labels."""

    model_config = ConfigDict(frozen=True)

    primary: str
    shadow: str
    fraction: float = Field(gt=0.0, le=1.0)

    @classmethod
    def parse(cls, text: str) -> ShadowRule:
        """``primary=shadow:fraction``, e.g. ``sentiment-lstm=sentiment-transformer:0.25``."""
        primary, sep, rest = text.partition("=")
        shadow, colon, fraction = rest.rpartition(":")
        if not sep or not colon or not primary or not shadow:
            raise ValueError(f"shadow rule {text!r}: expected PRIMARY=SHADOW:FRACTION")
        if primary == shadow:
            raise ValueError(f"shadow rule {text!r}: a model cannot shadow itself")
        return cls(primary=primary, shadow=shadow, fraction=float(fraction))

    def __str__(self) -> str:
        return f"{self.primary}={self.shadow}:{self.fraction:g}"


def refused_setting(error: ValidationError) -> str:
    """The first setting pydantic refused, in one line: ``invalid setting NAME: why``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid setting {where}: {message}" if where else f"invalid settings: {message}"


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _unreadable(path: Path) -> str | None:
    """Why the server could not read ``path`` at start-up, or None."""
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    if not os.access(path, os.R_OK):
        return "not readable by this user"
    return None


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, protected_namespaces=()
    )

    # --- where and what -------------------------------------------------------------------
    repository: Path = Field(defaults.REPOSITORY, description="model repository directory")
    host: str = Field("0.0.0.0", description="gRPC listen address")
    port: int = Field(defaults.GRPC_PORT, ge=0, le=65535,
                      description="gRPC port (0: any free port)")
    model_versions: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="pin versions, NAME=N (repeatable; env: comma-separated); "
        "default: the newest complete version of every model",
    )

    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="the server's event loop: uvloop (libuv) or asyncio's own; auto: uvloop "
        "when installed (measured in README 'Serving overhead')",
    )

    # --- ONNX Runtime ---------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when its provider really starts, else CPU"
    )
    cuda_device_id: int = Field(0, ge=0, description="GPU ordinal for the CUDA provider")
    precision: Literal["auto", "auto-int8", "fp32", "fp16", "int8"] = Field(
        "auto",
        description="auto: fp16 on CUDA if it passes its re-gate on the device (else fp32); on "
        "CPU int8 where it passed every export gate, batch invariance included (else fp32); "
        "only artifacts that passed their gates. auto-int8: the same, but it also serves an "
        "int8 from before the batch-invariance gate (schema 1-2). fp32/fp16/int8 force that "
        "artifact even if it failed its gates. A model's serving.json overrides this",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ORT intra-op threads of every model (0: by compute per token: "
        "every core for a compute-bound model, every core but one, left to the event loop, "
        "for a light one; 1 on CUDA). A model's serving.json overrides this")
    cpu_arena: Literal["shared", "session", "off"] = Field(
        "shared",
        description="ORT's CPU memory arena: one shared by every session of the process, one per "
        "session (ORT's default), or none (least memory, much slower on long batches)",
    )
    heap_retain_bytes: int = Field(
        64 * MIB, ge=0,
        description="freed heap the process keeps for reuse (glibc), so a big request reuses "
        "warm pages instead of faulting in fresh ones with the event loop blocked; 0: the "
        "allocator's defaults")
    inter_op_threads: int = Field(0, ge=0, description="ORT inter-op threads (0: ORT default)")
    allow_spinning: bool = Field(
        False,
        description="let ORT's idle threads spin-wait (session.intra_op.allow_spinning); off "
        "by default because spinning takes CPU from the event loop on small machines",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "extended",
        description="ORT graph optimisation level; 'all' crashed an fp16 transformer on CPU",
    )
    warmup: bool = Field(True, description="run every length bucket once before serving")
    cuda_use_tf32: bool = Field(
        False,
        description="let CUDA run fp32 MatMul/Gemm in TF32 (faster on Ampere and later, but "
        "rounds to 10 mantissa bits: the export's 1e-4 fp32 parity no longer holds); off also "
        "sets NVIDIA_TF32_OVERRIDE=0 for cuDNN's RNN kernels unless the environment has it",
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kSameAsRequested",
        description="how a CUDA session's memory arena grows; warm-up already reaches the "
        "largest batch, and a hot reload holds two versions, so no power-of-two slack",
    )
    cuda_mem_limit_bytes: int = Field(
        0, ge=0, description="cap on each CUDA session's memory arena (gpu_mem_limit; 0: none); "
        "a hot reload holds two versions of a model at once",
    )
    device_gate_min_agreement: float = Field(
        0.995, ge=0.0, le=1.0,
        description="on CUDA, --precision auto serves fp16 only if it predicts fp32's label on "
        "this fraction of the stored evaluation slice, run on the device (mirrors the export's "
        "--fp16-min-agreement)",
    )
    device_gate_max_accuracy_drop: float = Field(
        0.005, ge=0.0, le=1.0,
        description="and loses at most this much accuracy there (fraction; mirrors the export's "
        "--fp16-max-accuracy-drop)",
    )

    # --- batching -------------------------------------------------------------------------
    max_batch_texts: int = Field(32, ge=1, description="texts per executed batch")
    # On CPU, 8 x 256 tokens run as many texts per second as 16 x 256 (340 vs 345 LSTM, 167
    # vs 168 Transformer, 32 callers) while ONNX Runtime's arena keeps a third less peak: the
    # default pair's server holds 193 MB instead of 255 MB.
    max_batch_tokens: int = Field(
        2048, ge=1,
        description="padded tokens (longest text x texts) per executed batch; ONNX Runtime "
        "keeps the memory of the largest batch, and on CPU larger batches of long texts are "
        "not faster (a GPU may want more)",
    )
    max_batch_delay_ms: float = Field(
        2.0, ge=0.0,
        description="longest a queued text waits for others to batch with while the model is "
        "busy (an idle model runs a request at once)"
    )
    batch_cost_tokens: int = Field(
        64,
        ge=0,
        description="cost of one more batch run, in padded tokens: a text joins a batch only "
        "when the padding it adds is no more than this (groups texts by length)",
    )
    max_queue_texts: int = Field(
        1024, ge=1, description="texts waiting per model; beyond: RESOURCE_EXHAUSTED"
    )
    # Measured at 3x capacity (README "Guarantees"): with one batch waiting, an accepted call
    # waits for the batch running and its own, within 2x the unloaded p99.
    max_queue_batches: float = Field(
        1.0, ge=0.0,
        description="while more is offered to a model than it serves, full batches "
        "(--max-batch-texts texts or --max-batch-tokens tokens each) that may wait for it; "
        "beyond: RESOURCE_EXHAUSTED (reason overloaded) at once, before tokenizing (0: no such "
        "bound; bursts and steady concurrency are not refused by it)",
    )
    max_queue_delay_ms: float = Field(
        0.0, ge=0.0,
        description="expected wait in a model's queue (its queued tokens at its measured "
        "rate) beyond which a request is refused (RESOURCE_EXHAUSTED, reason overloaded); "
        "0: none. While a model is overloaded, a request whose deadline is nearer than the "
        "expected wait is refused either way",
    )

    # --- requests -------------------------------------------------------------------------
    max_texts_per_request: int = Field(64, ge=1, description="texts in one request")
    max_text_bytes: int = Field(
        256 * KIB, ge=1, description="UTF-8 bytes of one text; beyond: INVALID_ARGUMENT naming "
        "the text (tokenization stops at max_length anyway, so a long text costs little)")
    max_request_bytes: int = Field(
        4 * MIB, ge=1, description="UTF-8 bytes of all texts of one request; beyond: "
        "INVALID_ARGUMENT")
    max_inflight_requests: int = Field(
        128, ge=1,
        description="classify calls being processed in the whole server (all models, both "
        "APIs); beyond: RESOURCE_EXHAUSTED at once, before any work")
    # 128 rides out a ~0.1 s stall of the event loop at ~1,000 calls/s without shedding (64
    # shed calls in a 70 % soak on 2 shared cores); larger backlogs only lengthen the wait of
    # the calls accepted during a sustained overload (p99 ~0.3 s at 64, ~0.75 s at 256).
    max_pending_rpcs: int = Field(
        128, ge=1,
        description="calls gRPC has received but the server has not picked up yet (its event "
        "loop is busy); beyond: gRPC sheds them at once itself (C-core reports them CANCELLED) "
        "instead of parking them until their deadline")
    truncation: Literal["truncate", "reject"] = Field(
        "truncate",
        description="texts over the model's max_length: truncate and flag, or INVALID_ARGUMENT",
    )
    max_receive_message_bytes: int = Field(
        4 * MIB, ge=1024, description="largest request message; gRPC refuses larger ones"
    )
    max_send_message_bytes: int = Field(16 * MIB, ge=1024, description="largest response")
    max_stream_inflight: int = Field(
        16, ge=1, description="requests of one ClassifyStream processed at once"
    )

    # --- lifecycle ------------------------------------------------------------------------
    poll_interval_s: float = Field(
        10.0, ge=0.0, description="repository scan interval (0: only at start and on SIGHUP)"
    )
    drain_grace_s: float = Field(
        20.0, ge=0.0, description="after SIGTERM, how long in-flight calls may take to finish"
    )
    strict_startup: bool = Field(
        True, description="exit when any model fails to load at start-up"
    )
    max_connection_age_s: float = Field(
        0.0, ge=0.0, description="close connections after this age so clients rebalance (0: never)"
    )
    max_connection_age_grace_s: float = Field(
        0.0, ge=0.0, description="time given to calls on a connection closed for its age"
    )
    keepalive_time_s: float = Field(60.0, gt=0.0, description="server keepalive ping interval")
    keepalive_timeout_s: float = Field(20.0, gt=0.0, description="keepalive ping ack timeout")
    keepalive_min_client_ping_s: float = Field(
        10.0, ge=0.0, description="shortest client ping interval accepted"
    )
    reflection: bool = Field(True, description="serve gRPC server reflection")

    # --- security (service/server/security.py) --------------------------------------------
    tls_cert_file: Path | None = Field(
        None, description="server certificate chain, PEM, leaf first; with tls_key_file: TLS "
        "on the gRPC port, reloaded when the files change and on SIGHUP")
    tls_key_file: Path | None = Field(
        None, description="the private key of tls_cert_file (PEM, unencrypted)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA certificates (PEM) for mutual TLS: every client must present a "
        "certificate they signed")
    auth_token_file: Path | None = Field(
        None, description="bearer tokens, one per line (blank lines and # comments ignored): "
        "calls need metadata 'authorization: Bearer <token>'; reread on SIGHUP")
    auth_tokens: SecretStr | None = Field(
        None, description="bearer tokens, comma-separated, never logged; prefer the "
        "environment (SEQSERVE_AUTH_TOKENS) or auth_token_file, as a flag shows in ps")
    auth_open_services: str = Field(
        "grpc.health.v1.Health",
        description="gRPC services answered without a token, comma-separated ('' for none), "
        "e.g. add grpc.reflection.v1alpha.ServerReflection")

    # --- metrics and shadowing ------------------------------------------------------------
    metrics_host: str = Field(
        "127.0.0.1", description="Prometheus /metrics listen address (loopback unless set: "
        "the container images set 0.0.0.0 for their scraper)")
    metrics_port: int = Field(defaults.METRICS_PORT, ge=0, le=65535,
                              description="/metrics port (0: disabled)")
    shadow: Annotated[list[ShadowRule], NoDecode] = Field(
        default_factory=list,
        description="mirror traffic PRIMARY=SHADOW:FRACTION (repeatable; env: comma-separated)",
    )
    shadow_max_pending: int = Field(
        64, ge=1, description="shadow requests in flight per rule; beyond: dropped"
    )

    @field_validator("model_versions", mode="before")
    @classmethod
    def _parse_pins(cls, value: Any) -> Any:
        items = _split(value) if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            pins: dict[str, int] = {}
            for item in items:
                name, sep, number = str(item).partition("=")
                if not sep or not name or not number.strip().isdigit():
                    raise ValueError(f"model version {item!r}: expected NAME=N")
                pins[name.strip()] = int(number)
            return pins
        return value

    @field_validator("model_versions")
    @classmethod
    def _positive_pins(cls, pins: dict[str, int]) -> dict[str, int]:
        for name, number in pins.items():
            if number < 1:
                raise ValueError(f"model version {name}={number}: versions start at 1")
        return pins

    @field_validator("shadow", mode="before")
    @classmethod
    def _parse_shadow(cls, value: Any) -> Any:
        items = _split(value) if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            return [ShadowRule.parse(i) if isinstance(i, str) else i for i in items]
        return value

    @model_validator(mode="after")
    def _request_fits_queue(self) -> ServeSettings:
        if self.max_queue_texts < self.max_texts_per_request:
            raise ValueError(
                f"max_queue_texts ({self.max_queue_texts}) must be at least "
                f"max_texts_per_request ({self.max_texts_per_request}), or a full-size request "
                "could never be queued")
        return self

    @field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # An empty SEQSERVE_TLS_CERT_FILE= (a template with nothing filled in) means "not set".
        return None if value == "" else value

    @field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file")
    @classmethod
    def _readable_file(cls, path: Path | None) -> Path | None:
        problem = _unreadable(path) if path is not None else None
        if problem:
            raise ValueError(f"{path}: {problem}")
        return path

    @field_validator("auth_open_services")
    @classmethod
    def _service_names(cls, value: str) -> str:
        names = _split(value)
        for name in names:
            if not _SERVICE_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a gRPC service name (package.Service)")
        return ",".join(names)

    @model_validator(mode="after")
    def _tls_files_together(self) -> ServeSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and "
                             "tls_key_file")
        return self

    def open_services(self) -> tuple[str, ...]:
        """The gRPC services of ``auth_open_services``."""
        return tuple(_split(self.auth_open_services))

    @model_validator(mode="after")
    def _one_shadow_per_primary(self) -> ServeSettings:
        primaries = [rule.primary for rule in self.shadow]
        if len(primaries) != len(set(primaries)):
            raise ValueError("shadow: at most one rule per primary model")
        return self

    def describe(self, overridden: set[str] = frozenset()) -> list[str]:
        """One ``name=value (source)`` line per setting, for the start-up log."""
        lines = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "shadow":
                value = ",".join(str(rule) for rule in value) or "-"
            elif name in SECRET_FIELDS:
                value = "<set, not shown>" if value and value.get_secret_value() else "-"
            elif name == "model_versions":
                value = ",".join(f"{k}={v}" for k, v in value.items()) or "-"
            if name in overridden:
                source = "flag"
            elif f"{ENV_PREFIX}{name.upper()}" in os.environ:
                source = "env"
            else:
                source = "default"
            lines.append(f"{name}={value} ({source})")
        return lines
