"""Daemon settings: small pydantic sections, environment (EDGECAST_*, `__` nesting) over an optional TOML file.

Every field has a default, a bound and a description; unknown keys are errors. Secrets are SecretStr and may
be read from files (including systemd credentials in $CREDENTIALS_DIRECTORY), never logged.
"""

from __future__ import annotations

import math

import os
import socket
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.config.snapshot import SNAPSHOT_CLASSES, ModelMethods, MqttMethods, Secret, Snapshot
from agent.config.models import model_plans, overlap_problem
from agent.config.sparkplug import SparkplugSettings

DEFAULT_MODEL_NAME = "pump-lstm"


def shipped_model_path() -> Path:
    """The bundle shipped with edgecast: the source tree's exported_models/, or the installed copy."""
    source_tree = Path(__file__).resolve().parents[2] / "exported_models" / DEFAULT_MODEL_NAME
    if source_tree.is_dir():
        return source_tree
    from importlib.resources import files

    return Path(str(files("agent") / "shipped_models" / DEFAULT_MODEL_NAME))


def default_state_directory() -> Path:
    """systemd's StateDirectory= ($STATE_DIRECTORY, the first when several) or ./state."""
    state = os.environ.get("STATE_DIRECTORY")
    return Path(state.split(":")[0]) if state else Path("state")


def _numeric_not_bool(annotation: Any) -> bool:
    """The type takes an int or float and no bool (pydantic's lax mode would read true/false as 1/0)."""

    def walk(tp: Any) -> tuple[bool, bool]:  # (takes a number, takes a bool)
        if tp is bool:
            return False, True
        if tp in (int, float):
            return True, False
        origin = typing.get_origin(tp)
        if origin is Annotated:
            return walk(typing.get_args(tp)[0])
        if origin is Literal:
            args = typing.get_args(tp)
            return any(type(a) in (int, float) for a in args), any(isinstance(a, bool) for a in args)
        if origin in (typing.Union, types.UnionType):
            parts = [walk(arg) for arg in typing.get_args(tp)]
            return any(n for n, _ in parts), any(b for _, b in parts)
        return False, False

    number, boolean = walk(annotation)
    return number and not boolean


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # `port = true` in TOML must not become port 1: numbers refuse true/false (strings such as "1883" from
        # environment variables still parse as before).
        if isinstance(value, bool) and info.field_name and _numeric_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a boolean (true/false)")
        return value


class TlsConfig(Section):
    enabled: bool = Field(False, description="Connect with TLS (server certificate verified against ca_file or the system store).")
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate; system store when unset.")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Client private key for mutual TLS.")


class MqttConfig(Section, MqttMethods):
    host: str = Field("127.0.0.1", min_length=1, max_length=253, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive interval in seconds.")
    username: str | None = Field(None, max_length=256, description="Broker user name.")
    password: SecretStr | None = Field(None, description="Broker password (prefer password_file).")
    password_file: Path | None = Field(
        None, description="File holding the broker password; relative names are looked up in $CREDENTIALS_DIRECTORY first."
    )
    qos_in: Literal[0, 1] = Field(1, description="QoS of the sensor subscriptions.")
    at_least_once: bool = Field(
        False,
        description="End-to-end at-least-once input: a persistent session (clean session off) and each QoS 1 reading "
        "acknowledged to the broker only once it is processed (its alerts stored), so the broker redelivers what a crash or "
        "a stop out of time did not finish (duplicates are possible). Raise the broker's max_inflight_messages (mosquitto: "
        "20 by default) to a few thousand, or input is limited to that many readings per processing round trip.",
    )
    reconnect_min_s: float = Field(1.0, ge=0.1, le=60, description="First reconnect delay.")
    reconnect_max_s: float = Field(30.0, ge=1, le=3600, description="Largest reconnect delay.")
    max_queued_messages: int = Field(10000, ge=0, le=10_000_000, description="Outgoing messages paho keeps while offline (0: unbounded).")
    max_pending_forecast_mib: float = Field(
        16.0, ge=0, le=4096,
        description="Encoded forecasts (QoS 0) waiting in the client for the broker to take them, at most this many MiB: "
        "beyond it new ones are dropped, counted (edgecast_mqtt_dropped_publishes) and logged, so a broker that stops "
        "reading cannot grow the daemon's memory without bound (0: unbounded).",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings.")
    plaintext_password: Literal["refuse", "loopback", "allow"] = Field(
        "refuse",
        description="Sending the password without TLS: refuse (default), loopback (only to 127.0.0.1/::1/localhost), allow.",
    )

    @model_validator(mode="after")
    def _check(self) -> "MqttConfig":
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either mqtt.password or mqtt.password_file, not both")
        if (self.tls.cert_file is None) != (self.tls.key_file is None):
            raise ValueError("mutual TLS needs both mqtt.tls.cert_file and mqtt.tls.key_file")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        return self


class TopicsConfig(Section):
    telemetry: str = Field("sensors/{device}/telemetry", min_length=3, max_length=256, description="Input topic template of the whole-record form; needs {device}.")
    sensor: str | None = Field("sensors/{device}/{sensor}", max_length=256, description="Input topic template of the per-sensor form; needs {device} and {sensor}; empty disables it.")
    output_prefix: str = Field("edgecast", min_length=1, max_length=128, description="Prefix of every topic the agent publishes.")

    @model_validator(mode="after")
    def _check(self) -> "TopicsConfig":
        if "{device}" not in self.telemetry:
            raise ValueError("topics.telemetry must contain the {device} placeholder, e.g. 'sensors/{device}/telemetry'")
        if "{sensor}" in self.telemetry:
            raise ValueError("topics.telemetry carries all features in one payload; use topics.sensor for the per-sensor form")
        if self.sensor:
            if "{device}" not in self.sensor or "{sensor}" not in self.sensor:
                raise ValueError("topics.sensor must contain both {device} and {sensor}, e.g. 'sensors/{device}/{sensor}'")
        for name in ("telemetry", "sensor", "output_prefix"):
            value = getattr(self, name) or ""
            if "+" in value or "#" in value:
                raise ValueError(f"topics.{name} must not contain MQTT wildcards; use the {{device}} placeholder")
        return self


MAX_TRUSTED_KEYS = 16
PublicKeyHex = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-fA-F]{64}$")]


class ModelConfig(Section, ModelMethods):
    path: Path = Field(default_factory=shipped_model_path, description="Model bundle folder (model.onnx + manifest.json).")
    intra_op_threads: int = Field(1, ge=0, le=64, description="onnxruntime intra-op threads (0: onnxruntime decides).")
    public_key: PublicKeyHex | Annotated[list[PublicKeyHex], Field(min_length=1, max_length=MAX_TRUSTED_KEYS)] | None = Field(
        None,
        description="ed25519 public key (64 hex digits) that signs bundles (manifest.json.sig over manifest.json), or a list of "
        "such keys, any of which may sign (key rotation: trust the new key beside the old one, then drop the old one; "
        "at most 16; in the environment a JSON list).",
    )
    public_key_file: Path | Annotated[list[Path], Field(min_length=1, max_length=MAX_TRUSTED_KEYS)] | None = Field(
        None,
        description="File holding the ed25519 public key(s) (hex, one per line), a directory whose *.pub files are trusted, or a "
        "list of these; relative names are looked up in $CREDENTIALS_DIRECTORY first.",
    )
    require_signature: bool = Field(False, description="Refuse bundles without a valid signature (needs public_key or public_key_file).")
    reload_poll_s: float = Field(10.0, ge=0.0, le=86400.0, description="How often the model folder is checked for a new bundle (0: only on SIGHUP).")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.public_key is not None and self.public_key_file is not None:
            raise ValueError("set either model.public_key or model.public_key_file, not both")
        if self.require_signature and self.public_key is None and self.public_key_file is None:
            raise ValueError("model.require_signature needs model.public_key or model.public_key_file")
        return self


class IngestConfig(Section):
    max_payload_bytes: int = Field(16384, ge=64, le=1_048_576, description="Larger payloads are rejected unread.")
    queue_size: int = Field(10000, ge=10, le=10_000_000, description="Bound of the queue between the MQTT thread and the worker.")
    max_future_s: float = Field(300.0, ge=0, le=86400, description="Timestamps further ahead of the agent clock are rejected.")
    max_age_s: float = Field(7 * 86400.0, ge=60, le=10 * 365 * 86400.0, description="Timestamps older than this are rejected.")
    unknown_features: Literal["reject", "ignore"] = Field("reject", description="What to do with values the model does not use.")
    max_devices: int = Field(100_000, ge=1, le=10_000_000, description="Devices beyond this many are rejected (memory bound).")
    device_idle_s: float = Field(
        3600.0, ge=0.0, le=365 * 86400.0,
        description="With ingest.max_devices known, a new device takes the row of the device silent longest, if it has "
        "been silent this long (its window, detector state and open alert end); else it is rejected as device_limit. 0: never evict.",
    )
    plausible_range_stds: float = Field(
        1000.0, ge=1.0, le=1e12,
        description="Readings further than this many training standard deviations from the training mean (the bundle's "
        "scaler) are rejected as out_of_range: a broken sensor's 1e30 must not reach the model. ingest.value_limits overrides it per feature.",
    )
    value_limits: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description='Per feature, the [low, high] readings accepted (original units), e.g. {bearing_temp = [-40, 250]}.'
    )

    @model_validator(mode="after")
    def _check_limits(self) -> "IngestConfig":
        for name, (low, high) in self.value_limits.items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"ingest.value_limits.{name} must be [low, high] with finite low < high, got [{low}, {high}]")
        return self
    full_wait_s: float = Field(
        10.0, ge=0.0, le=600.0,
        description="How long the MQTT thread waits for room in a full ingest queue (it stops reading meanwhile, so "
        "QoS 1 readings stay with the broker) before the sample is rejected as queue_full; capped at mqtt.keepalive_s / 2.",
    )


class StateConfig(Section):
    directory: Path = Field(default_factory=default_state_directory, description="Where the outbox, rolled-out bundles and the release ledger (releases.json) live ($STATE_DIRECTORY under systemd, else ./state).")


class OutboxConfig(Section):
    enabled: bool = Field(True, description="Alerts go through a durable store-and-forward queue (SQLite, WAL) in state.directory.")
    forecasts: bool = Field(False, description="Forecasts go through the outbox too (then at QoS 1); otherwise QoS 0, dropped while offline.")
    max_messages: int = Field(100_000, ge=10, le=100_000_000, description="Most messages kept; beyond it forecasts are dropped first, then alerts, oldest first.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=65536, le=64 * 1024**3, description="Most payload bytes kept (same drop policy).")
    max_age_s: float = Field(7 * 86400.0, ge=60.0, le=365 * 86400.0, description="Messages older than this are dropped undelivered.")
    inflight: int = Field(20, ge=1, le=1000, description="Outbox messages handed to the broker connection before their acks come back.")
    synchronous: Literal["full", "normal"] = Field("full", description="SQLite synchronous mode: full survives power loss, normal only process crashes.")


class HealthConfig(Section):
    max_stall_s: float = Field(60.0, ge=1.0, le=3600.0, description="A worker or MQTT loop silent for longer is unhealthy: the systemd watchdog is no longer fed.")


class WindowConfig(Section):
    max_gap_periods: int = Field(10, ge=1, le=100_000, description="A longer gap restarts the device's window; shorter gaps are filled forward and count as imputed.")
    min_completeness: float = Field(0.8, ge=0.0, le=1.0, description="Windows with a smaller observed share produce forecasts but no alerts.")
    clean_periods: int = Field(
        2, ge=1, le=1000,
        description="A forecast is used for scoring only when the newest N slots of its window were observed, not filled forward (a stale window mispredicts ramps).",
    )
    max_lateness_periods: int = Field(
        10, ge=0, le=100_000,
        description="A sample up to this many periods older than the device's newest slot is put in its place in the window (reordering); older ones are rejected as late_sample.",
    )


class InferenceConfig(Section):
    max_batch: int = Field(
        64, ge=1, le=65536,
        description="Most windows run in one onnxruntime call (64 measured fastest per window for the shipped LSTM on a small CPU, and far less memory than 512).",
    )
    stride: int = Field(1, ge=1, le=10_000, description="Run the model every N-th sample of a device.")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000,
        description="When a read from the broker brings fewer readings than one full model batch (max_batch x stride), the MQTT "
        "thread waits until the first of them is this old and takes what came meanwhile, then the worker runs them together. Readings "
        "that trickle in one at a time then cost one wake-up of each thread and one model call per few readings instead of per "
        "reading (docs/benchmarks.md, paced phases) for at most this much more latency; 0: hand each read on as it comes.",
    )
    adaptive_intervals: bool = Field(
        True,
        description="For a bundle whose prediction intervals carry an `adaptive` member: widen or narrow each device's band "
        "online by the coverage it has had, so that the published 80 %/95 % bands hold their level after the data drift from "
        "the calibration months (docs/contracts.md, 'Prediction intervals'). Costs per device 8 x levels x horizon x targets x "
        "(horizon + 1) bytes of bands waiting for their reading (7 KB for 2 levels, horizon 10, 4 targets); false: publish the "
        "calibrated band as it is.",
    )
    model_cpu: Literal["auto", "off"] | Annotated[int, Field(ge=0, le=4095)] = Field(
        "auto",
        description="The CPU the model thread runs on, with the daemon's other threads on the rest, so that they do not take "
        "the model's core from under it (+6% throughput on 2 cores, docs/benchmarks.md). auto: with model.intra_op_threads 1 and "
        "at least 2 usable CPUs per partition, the last usable CPU counting back by partition.index (the other threads "
        "of every partition share the CPUs before the last partition.count); off: no pinning; or a CPU number (0-4095), "
        "which must be usable by the process.",
    )


class PartitionConfig(Section):
    count: int = Field(1, ge=1, le=256, description="Processes sharing the input by device hash (agent/transport/partition.py); 1: this process takes every device.")
    index: int = Field(0, ge=0, le=255, description="This process's partition, 0..count-1: it keeps the devices whose crc32(name) % count equals it and drops the others before decoding.")

    @model_validator(mode="after")
    def _check(self) -> "PartitionConfig":
        if self.index >= self.count:
            raise ValueError(f"partition.index ({self.index}) must be smaller than partition.count ({self.count})")
        return self


class DetectConfig(Section):
    enabled: bool = Field(True, description="Publish anomaly alerts.")
    min_samples_over: int = Field(3, ge=1, le=10_000, description="Consecutive samples over the warning threshold before an alert opens.")
    min_samples_under: int = Field(5, ge=1, le=10_000, description="Consecutive samples under the exit threshold before an alert ends.")
    cooldown_samples: int = Field(10, ge=0, le=100_000, description="Samples after an alert ends before a new one may open.")
    update_every_samples: int = Field(10, ge=1, le=100_000, description="Most frequent `update` event of an open alert, in samples.")
    threshold_scale: float = Field(1.0, gt=0.0, le=100.0, description="Multiplies the bundle's calibrated thresholds (>1: fewer alerts).")
    threshold_mode: Literal["fixed", "dynamic"] = Field(
        "fixed", description="fixed: the calibrated thresholds; dynamic: per-device nonparametric thresholds over recent scores (Hundman et al. 2018)."
    )
    dynamic_window_samples: int = Field(720, ge=20, le=100_000, description="Dynamic mode: scores per device the threshold is computed from.")
    dynamic_every_samples: int = Field(30, ge=1, le=100_000, description="Dynamic mode: recompute a device's threshold every N scored samples.")
    dynamic_floor: float = Field(1.0, gt=0.0, le=100.0, description="Dynamic mode: the warning never goes below this multiple of the calibrated warning (1: dynamic thresholds only ever raise it, for noisy devices).")
    flatline: bool = Field(True, description="Use the bundle's calibrated flat-line check (a sensor repeating exactly the same value).")
    flap_window_samples: int = Field(
        240, ge=0, le=1_000_000, description="Flap suppression: when flap_max_alerts alerts opened within this many samples, the next end is followed by a cooldown of this length (0: off)."
    )
    flap_max_alerts: int = Field(3, ge=1, le=1000, description="Flap suppression: alerts within flap_window_samples that count as flapping.")
    learning_hours: float = Field(
        0.0, ge=0.0, le=8760.0,
        description="Learning period per device (0: off): a device's first hours of data raise no alert and teach the agent its "
        "normal level and spread, which then stand in for the training machines' (a bundle trained on other machines); "
        "kept in state.directory/learned-normal.json across restarts.",
    )
    learning_min_samples: int = Field(
        60, ge=2, le=10_000_000, description="Learning period: at least this many observed samples per device (and the model's lookback)."
    )


class ErrorsConfig(Section):
    max_per_minute: int = Field(60, ge=0, le=100_000, description="Most messages on the errors topic in any 60 s window (at most half of them back to back); the rest are counted as suppressed.")


class LogConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["text", "json"] = Field(
        "text",
        description="text: human-readable lines; json: one JSON object per line (ts, level, logger, message, event fields). "
        "Under systemd (JOURNAL_STREAM set) neither carries a timestamp: the journal adds its own.",
    )


class MetricsConfig(Section):
    enabled: bool = Field(False, description="Serve Prometheus metrics over HTTP (needs the `metrics` extra: prometheus-client).")
    host: str = Field("127.0.0.1", min_length=1, max_length=253, description="Address the metrics endpoint listens on (0.0.0.0: every interface).")
    port: int = Field(9810, ge=0, le=65535, description="TCP port of the metrics endpoint (GET /metrics); 0 picks a free one (logged).")


class HomeAssistantConfig(Section):
    enabled: bool = Field(False, description="Publish Home Assistant MQTT discovery: per device, forecast sensors and an alert binary_sensor.")
    discovery_prefix: str = Field("homeassistant", min_length=1, max_length=128, description="Home Assistant's discovery prefix.")
    birth_topic: str = Field("homeassistant/status", min_length=1, max_length=256, description="Home Assistant's birth topic: discovery is published again when it says `online`.")

    @model_validator(mode="after")
    def _check(self) -> "HomeAssistantConfig":
        for name in ("discovery_prefix", "birth_topic"):
            value = getattr(self, name)
            if "+" in value or "#" in value:
                raise ValueError(f"homeassistant.{name} must not contain MQTT wildcards")
        return self


class RolloutConfig(Section):
    enabled: bool = Field(
        False,
        description="Accept model bundles published over MQTT (`python -m training publish-model`); each must be signed by "
        "model.public_key (or public_key_file), is stored in state.directory/models and swapped in like a reload.",
    )
    topic: str = Field(
        "edgecast/models/pump-lstm", min_length=1, max_length=200,
        description="Model-update topic (its retained descriptor; chunks under TOPIC/chunks/...). One topic per model family and rollout stage.",
    )
    max_bundle_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=2 * 1024**3, description="Larger published bundles are refused without downloading them.")
    transfer_timeout_s: float = Field(300.0, ge=1.0, le=86400.0, description="A transfer whose chunks are not all in by then is abandoned and reported.")

    @model_validator(mode="after")
    def _check(self) -> "RolloutConfig":
        if "+" in self.topic or "#" in self.topic:
            raise ValueError("rollout.topic must not contain MQTT wildcards")
        return self


class AlarmsConfig(Section):
    enabled: bool = Field(
        True,
        description="Take operator commands on <output_prefix>/<device>/command: acknowledge, shelve, maintenance (out of service) "
        "and feedback (docs/operators.md); limit who may publish there with the broker's ACL.",
    )
    max_shelve_s: float = Field(8 * 3600.0, ge=60.0, le=7 * 86400.0, description="Longest shelving; a shelved alert always comes back by itself when its time runs out.")
    max_maintenance_s: float = Field(
        30 * 86400.0, ge=60.0, le=365 * 86400.0,
        description="Longest maintenance period given with an end time (one given without an end lasts until ended).",
    )


class ModelEntry(ModelConfig):
    """One model of several (`[[models]]`): a bundle, the devices it serves, and its own sections where they differ."""

    name: str = Field(
        "model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="The model's name in status, metrics, logs, state files and `replay --model` (unique; letters, digits, _ and -).",
    )
    devices: list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:*?-]+$")]] = Field(
        default_factory=lambda: ["*"], min_length=1, max_length=64,
        description="Device-name patterns this model serves (`*` any characters, `?` one), matched on the {device} of the input topic.",
    )
    telemetry: str | None = Field(None, max_length=256, description="This model's whole-record input topic template (default: topics.telemetry).")
    sensor: str | None = Field(None, max_length=256, description="This model's per-sensor input topic template (default: topics.sensor; empty disables it).")
    rollout_topic: str | None = Field(
        None, max_length=200, description="This model's rollout topic (default: rollout.topic/<name>).",
    )
    window: WindowConfig | None = Field(None, description="This model's [window] section (default: the top-level one).")
    detect: DetectConfig | None = Field(None, description="This model's [detect] section (default: the top-level one).")
    inference: InferenceConfig | None = Field(None, description="This model's [inference] section (default: the top-level one).")

    @model_validator(mode="after")
    def _check_entry(self) -> "ModelEntry":
        TopicsConfig(telemetry=self.telemetry or "sensors/{device}/telemetry", sensor=self.sensor or None)  # the same rules
        for name in ("telemetry", "sensor", "rollout_topic"):
            value = getattr(self, name) or ""
            if "+" in value or "#" in value:
                raise ValueError(f"models.{name} of {self.name!r} must not contain MQTT wildcards")
        return self


class Settings(BaseSettings):
    """The whole daemon configuration."""

    model_config = SettingsConfigDict(env_prefix="EDGECAST_", env_nested_delimiter="__", extra="forbid", validate_assignment=True)

    agent_id: str = Field(
        default_factory=lambda: socket.gethostname() or "edgecast",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of this agent in its status and errors topics (default: host name).",
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    window: WindowConfig = Field(default_factory=WindowConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    errors: ErrorsConfig = Field(default_factory=ErrorsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    sparkplug: SparkplugSettings = Field(default_factory=SparkplugSettings)
    alarms: AlarmsConfig = Field(default_factory=AlarmsConfig)
    models: list[ModelEntry] = Field(
        default_factory=list, max_length=32,
        description="Several models in one daemon (`[[models]]`, instead of `[model]`): each serves the devices its patterns "
        "name, with its own windows, detector, reload and rollout; empty: the single [model].",
    )

    @model_validator(mode="after")
    def _check_rollout(self) -> "Settings":
        # Bundles arriving over the network are only ever accepted with a signature.
        for entry, where in [(e, f"models {e.name!r}") for e in self.models] or [(self.model, "model")]:
            if self.rollout.enabled and entry.public_key is None and entry.public_key_file is None:
                raise ValueError(f"rollout.enabled needs {where}.public_key or public_key_file (published bundles must be signed)")
        return self

    @model_validator(mode="after")
    def _check_models(self) -> "Settings":
        if not self.models:
            return self
        if "model" in self.model_fields_set:
            raise ValueError("set either [model] (one model) or [[models]] (several), not both: move [model] into a [[models]] entry")
        names = [entry.name for entry in self.models]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"models: names must be unique, {twice} appear more than once")
        problem = overlap_problem(self)
        if problem is not None:
            raise ValueError(problem)
        if self.sparkplug.enabled and len(self.models) > 1:
            raise ValueError("the Sparkplug B input serves one model: with sparkplug.enabled, configure a single model "
                             "([model], or one [[models]] entry); run a second agent for the other machine types")
        topics = [plan.rollout_topic for plan in model_plans(self)]
        if len(set(topics)) < len(topics):
            raise ValueError("models: two models have the same rollout_topic; each needs its own")
        return self

    toml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)


class UnknownEnvironmentVariable(ValueError):
    """An EDGECAST_* variable that names no setting (pydantic-settings would silently ignore it)."""


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Every EDGECAST_* variable must name a setting: `EDGECAST_MQTT__HOST` -> mqtt.host (case-insensitive)."""
    environ = os.environ if environ is None else environ
    prefix = Settings.model_config["env_prefix"]
    delimiter = Settings.model_config["env_nested_delimiter"]
    for variable in sorted(environ):
        if not variable.upper().startswith(prefix):
            continue
        path = variable[len(prefix) :].lower().split(delimiter)
        model: Any = Settings
        for depth, part in enumerate(path):
            fields = getattr(model, "model_fields", None)
            if fields is None or part not in fields:
                known = ", ".join(sorted(fields)) if fields else "none (not a section)"
                where = ".".join(path[:depth]) or "the top level"
                raise UnknownEnvironmentVariable(
                    f"unknown environment variable {variable}: no setting {'.'.join(path[: depth + 1])!r} "
                    f"(settings at {where}: {known}; nesting uses '{delimiter}')"
                )
            annotation = fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from `config_file` (TOML, optional) with EDGECAST_* environment variables taking precedence.

    Raises FileNotFoundError, UnknownEnvironmentVariable or pydantic.ValidationError (with field paths).
    """
    path = Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    check_environment()

    class FileSettings(Settings):
        toml_file: ClassVar[Path | None] = path

    return FileSettings(**overrides)


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as JSON-able data, with every secret masked."""
    data = settings.model_dump(mode="json")  # SecretStr dumps as "**********" already; be explicit anyway
    if settings.mqtt.password is not None:
        data["mqtt"]["password"] = "**********"
    return data


def freeze(value: Any) -> Any:
    """Validated settings (or a section) as a read-only Snapshot of plain values (agent/config/snapshot.py)."""
    if isinstance(value, BaseModel):
        fields = {field: freeze(getattr(value, field)) for field in type(value).model_fields}
        return SNAPSHOT_CLASSES.get(type(value).__name__, Snapshot)(fields)
    if isinstance(value, SecretStr):
        return Secret(value.get_secret_value())
    if isinstance(value, (list, tuple)):
        return type(value)(freeze(item) for item in value)
    if isinstance(value, dict):
        return {key: freeze(item) for key, item in value.items()}
    return value
