"""One model of the daemon: its bundle, pipeline and input checks, and everything that replaces or keeps them.

A ModelRuntime loads, verifies and warms up its bundle (a rolled-out one first, when rollout is on), builds its
pipeline (windows, detector) and its ingest (the features, plausible ranges and topics of this model), and
keeps what must survive a restart: the open alerts and the devices' learned normals. A reload or a rollout
loads the new bundle beside the running one on the watcher thread (`reload`); the worker swaps it in between
two batches (`swap`), so no batch ever sees half a model. Each model of `[[models]]` has one, with its own
state files and rollout topic; the single `[model]` keeps the file names it always had.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config.models import ModelPlan
from agent.core.events import AlertEvent

if TYPE_CHECKING:
    from agent.core.pipeline import Pipeline
    from agent.ops.releases import ReleaseLedger
    from agent.transport.errors import ErrorReporter
    from agent.transport.ingest import Ingest

log = logging.getLogger(__name__)

OPEN_ALERTS_FILE = "open-alerts.json"  # in state.directory: alerts open at the last stop, resumed at the next start
LEARNED_FILE = "learned-normal.json"  # in state.directory: each device's learned normal (detect.learning_hours)


class ModelRuntime:
    """One configured model and its running bundle; `bundle`, `pipeline` and `ingest` change only in `swap`."""

    def __init__(self, plan: ModelPlan, index: int, releases: ReleaseLedger, errors: ErrorReporter,
                 clock: Callable[[], float], on_change: Callable[[], None]):
        self.plan = plan
        self.name = plan.name
        self.index = index  # Sample.model of this model's samples
        self.settings = plan.settings  # the shared sections with this model's own in place
        self.releases = releases
        self.errors = errors
        self.clock = clock
        self._on_change = on_change  # status changed (a swap, a refused reload): republish it
        state = Path(self.settings.state.directory)
        suffix = "" if plan.single else f".{plan.name}"
        self.open_alerts_path = state / OPEN_ALERTS_FILE.replace(".json", f"{suffix}.json")
        self.learned_path = state / LEARNED_FILE.replace(".json", f"{suffix}.json")
        self.models_dir = state / "models" if plan.single else state / "models" / plan.name  # rolled-out bundles
        self.model_dir = Path(self.settings.model.path)  # where the running bundle came from (a rollout changes it)
        self.bundle = None
        self.pipeline: Pipeline | None = None
        self.ingest: Ingest | None = None
        self.pending = None  # a verified bundle waiting for the worker to swap it in
        self.observer = None  # (batch, seconds) after every model call: the metrics' histograms
        self.rollout = None  # agent.ops.rollout.RolloutReceiver when rollout.enabled
        self.rollouts: queue.Queue[tuple[dict, bytes]] = queue.Queue()  # complete transfers for the watcher
        self.reload_outcome: dict | None = None
        self.open_alerts: dict[str, dict[str, AlertEvent]] = {}  # device -> alert id -> latest event (publisher only)
        self.swaps = 0
        self.tag = "model" if plan.single else f"model {plan.name}"  # in log lines
        self.failures = 0  # reloads and rollouts refused

    # -- start and stop ------------------------------------------------------------------------------------

    def load(self) -> list[AlertEvent]:
        """Load and verify the bundle, build the pipeline and the ingest, restore the state of the last run;
        returns the end events of alerts that were open under another model. Raises model.BundleError."""
        from agent.core.model import load_configured_bundle
        from agent.core.pipeline import Pipeline
        from agent.transport.ingest import Ingest

        self.bundle = self._rolled_out_bundle() or self.releases.admit(load_configured_bundle(self.settings.model))
        self.releases.record(self.bundle)
        self.model_dir = Path(self.bundle.path)
        bundle = self.bundle
        log.info(
            "%s %s %s loaded from %s (sha256 %s..., %s, lookback %d, horizon %d, period %ss)",
            self.tag, bundle.name, bundle.version, self.model_dir, bundle.sha256[:12],
            "signature verified" if bundle.signed else "unsigned", bundle.lookback, bundle.horizon, bundle.period_s,
        )
        bundle.observer = self.observer
        self.pipeline = Pipeline(bundle, self.settings)
        self._restore_learned()
        ended = self._restore_open_alerts()
        self.ingest = Ingest(self.settings, list(bundle.features), self.plausible_limits(bundle))
        # A reading of a device that cannot get a row is rejected before the queue (counted once, never accepted).
        self.ingest.device_gate = lambda device, now: self.pipeline.admits(device, now)
        self.ingest.device_limit_detail = lambda: self.pipeline.device_limit_detail()
        return ended

    def save(self) -> None:
        """At stop, after the last batch: the open alerts and the learned normals, for the next start."""
        self.save_learned()
        self._save_open_alerts()

    def describe(self) -> dict:
        """The running bundle, for status and stats."""
        out = {"model": self.name, **self.bundle.describe()}
        if self.reload_outcome is not None:
            out["reload"] = self.reload_outcome
        return out

    def plausible_limits(self, bundle) -> dict[str, tuple[float, float]]:
        from agent.transport.ingest import plausible_limits

        return plausible_limits(list(bundle.features), bundle.offset, bundle.scale, self.settings.ingest)

    # -- reload: load beside the running bundle (watcher thread) -------------------------------------------

    def fingerprint(self) -> tuple:
        """What changes when the bundle folder's files do (a symlinked folder swapped counts too)."""
        from agent.core.signing import SIGNATURE_FILE

        out = []
        for name in ("manifest.json", "model.onnx", SIGNATURE_FILE):
            try:
                st = (self.model_dir / name).stat()
                out.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((name, None))
        return tuple(out)

    def reload(self, trigger: str, folder: Path | None = None, signature_required: bool = False) -> bool:
        """Load and verify a bundle beside the running one (the running folder unless `folder`); True when it
        will be swapped in, False when refused (reported) or unchanged."""
        from agent.core.model import BundleError, load_configured_bundle

        running = self.bundle
        assert running is not None
        folder = self.model_dir if folder is None else folder
        log.info("%s: reloading the bundle from %s (%s)", self.tag, folder, trigger)
        config = self.settings.model.model_copy(update={"path": folder})
        if signature_required:
            config = config.model_copy(update={"require_signature": True})
        try:
            bundle = self.releases.admit(load_configured_bundle(config))  # checksum, signature, shapes, warm-up, release
            if list(bundle.features) != list(running.features):
                raise BundleError(f"the new bundle's features {bundle.features} differ from the running model's {running.features}")
        except (BundleError, OSError) as exc:
            self.reload_failed(trigger, str(exc))
            return False
        except Exception as exc:  # anything else must not end the watcher either
            log.exception("unexpected error loading the new bundle")
            self.reload_failed(trigger, f"{type(exc).__name__}: {exc}")
            return False
        if bundle.sha256 == running.sha256 and bundle.manifest == running.manifest:
            log.info("%s: bundle unchanged (sha256 %s...); keeping the running one", self.tag, bundle.sha256[:12])
            return False
        bundle.observer = self.observer
        self.pending = bundle  # the worker swaps it in between two batches
        return True

    def reload_failed(self, trigger: str, detail: str) -> None:
        running = self.bundle
        self.failures += 1
        self.reload_outcome = {"state": "failed", "trigger": trigger, "detail": detail[:300], "ts": round(self.clock())}
        where = "" if self.plan.single else f"model {self.name}: "
        self.errors.fault("model_reload_failed", f"{where}{detail}; still running {running.name} {running.version} ({running.sha256[:12]}...)")
        self._on_change()

    # -- swap: the worker, between two batches ---------------------------------------------------------------

    def swap(self) -> list[AlertEvent] | None:
        """A new pipeline for the pending bundle; returns the end events of this model's open alerts (to publish
        before anything of the new model), or None when the pipeline could not be built (reported)."""
        from agent.core.pipeline import Pipeline

        bundle, self.pending = self.pending, None
        old = self.bundle
        try:
            pipeline = Pipeline(bundle, self.settings)
        except Exception as exc:
            self.reload_failed("swap", f"cannot build a pipeline for the new bundle: {exc}")
            return None
        now = self.clock()
        ended = [dataclasses.replace(event, state="end", ts=now, ended_at=now)
                 for alerts in self.open_alerts.values() for event in alerts.values()]
        if ended:
            log.info("%s swap: ending %d open alerts of the old model", self.tag, len(ended))
        if pipeline.learning.enabled:
            pipeline.load_learned(self.pipeline.learned())  # a device's normal belongs to the machine, not the model
        self.pipeline, self.bundle = pipeline, bundle
        self.releases.record(bundle)
        self.ingest.set_limits(self.plausible_limits(bundle))
        previous_dir, self.model_dir = self.model_dir, Path(bundle.path)
        if self.rollout is not None:
            self.rollout.model_changed()
            if self.model_dir.parent.resolve() == self.models_dir.resolve():
                self._remember_rolled_out(self.model_dir, previous_dir)
        self.swaps += 1
        self.reload_outcome = {"state": "ok", "version": bundle.version, "sha256": bundle.sha256, "ts": round(now)}
        if bundle.release is not None:
            self.reload_outcome["release"] = bundle.release
        log.info(
            "%s swapped: %s %s (%s...) -> %s %s (%s...); per-device windows restart (forecasts resume after %d samples)",
            self.tag, old.name, old.version, old.sha256[:12], bundle.name, bundle.version, bundle.sha256[:12], bundle.lookback,
        )
        return ended

    # -- rollout over MQTT ------------------------------------------------------------------------------------

    def make_rollout(self, subscribe: Callable[[str], None], unsubscribe: Callable[[str], None],
                     arrived: Callable[[], None]) -> list[str]:
        """The rollout receiver of this model (its own topic); returns the topics it subscribes to."""
        from agent.ops.rollout import RolloutReceiver

        ro = self.settings.rollout

        def complete(descriptor: dict, archive: bytes) -> None:
            self.rollouts.put((descriptor, archive))  # unpacking and verifying happen on the watcher thread
            arrived()

        self.rollout = RolloutReceiver(
            self.plan.rollout_topic, ro.max_bundle_bytes, ro.transfer_timeout_s, subscribe=subscribe, unsubscribe=unsubscribe,
            running=lambda: (self.bundle.version, self.bundle.sha256, self.bundle.release),
            on_complete=complete, on_failure=lambda detail: self.reload_failed("rollout", detail),
        )
        return self.rollout.subscriptions()

    def apply_latest_rollout(self) -> None:
        """Watcher thread: the newest complete transfer (older ones are superseded), checked, unpacked, loaded."""
        latest = None
        while True:
            try:
                latest = self.rollouts.get_nowait()
            except queue.Empty:
                break
        if latest is not None:
            self._apply_rollout(*latest)

    def _apply_rollout(self, descriptor: dict, archive: bytes) -> None:
        from agent.ops.rollout import RolloutError, unpack_bundle

        transfer = descriptor["transfer_id"]
        trigger = f"rollout {descriptor['name']} {descriptor['version']} (transfer {transfer})"
        actual = hashlib.sha256(archive).hexdigest()
        if actual != descriptor["archive_sha256"]:
            self.reload_failed(trigger, f"archive sha256 is {actual}, the descriptor says {descriptor['archive_sha256']}: corrupted or tampered in transit")
            return
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{descriptor['name']}-{descriptor['version']}")
        folder = self.models_dir / f"{safe}-{transfer}"
        incoming = self.models_dir / f".incoming-{transfer}"
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(incoming, ignore_errors=True)
            unpack_bundle(archive, incoming)
            if folder.exists() and folder.resolve() != self.model_dir.resolve():
                shutil.rmtree(folder)
            if not folder.exists():
                incoming.rename(folder)
        except (RolloutError, OSError) as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            self.reload_failed(trigger, str(exc))
            return
        shutil.rmtree(incoming, ignore_errors=True)
        if not self.reload(trigger, folder=folder, signature_required=True):
            if folder.resolve() != self.model_dir.resolve():
                shutil.rmtree(folder, ignore_errors=True)

    def _rolled_out_bundle(self):
        """At start, with rollout enabled: the last rolled-out bundle (models/active), if it verifies."""
        from agent.core.model import BundleError, load_configured_bundle

        if not self.settings.rollout.enabled:
            return None
        try:
            name = (self.models_dir / "active").read_text(encoding="utf-8").strip()
        except OSError:
            return None
        folder = self.models_dir / name
        configured = self.settings.model.path
        try:
            bundle = self.releases.admit(load_configured_bundle(self.settings.model.model_copy(update={"path": folder, "require_signature": True})))
        except (BundleError, OSError) as exc:
            log.warning("rollout: the last rolled-out bundle %s is unusable (%s); starting with %s", folder, exc, configured)
            return None
        log.info("rollout: starting with the last rolled-out bundle %s (instead of %s)", folder, configured)
        return bundle

    def _remember_rolled_out(self, folder: Path, previous: Path) -> None:
        """Mark `folder` as the active rolled-out bundle; keep it and the previous one, remove older ones."""
        try:
            marker = self.models_dir / "active"
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(folder.name + "\n", encoding="utf-8")
            tmp.replace(marker)
            keep = {folder.resolve(), previous.resolve()}
            for old in self.models_dir.iterdir():
                if old.is_dir() and old.resolve() not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            log.warning("rollout: cannot record the active bundle in %s: %s", self.models_dir, exc)

    # -- state kept across restarts ---------------------------------------------------------------------------

    def _restore_open_alerts(self) -> list[AlertEvent]:
        """The alerts open at the last stop resume (same model: the detector decides their end as if there had
        been no restart) or end now (another model); returns those end events."""
        path = self.open_alerts_path
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("open alerts of the last run in %s unreadable (%s); they are not resumed", path, exc)
            return []
        resumed, ended = self.pipeline.restore_open_alerts(data, self.clock())
        for event in resumed:
            self.open_alerts.setdefault(event.device, {})[event.alert_id] = event
        if resumed or ended:
            log.info("open alerts of the last run: %d resumed, %d ended (the model changed)", len(resumed), len(ended))
        return ended

    def _save_open_alerts(self) -> None:
        if self.pipeline is None:
            return
        path = self.open_alerts_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.pipeline.open_alerts_state()), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write the open alerts to %s: %s; they will not resume after a restart", path, exc)

    def _restore_learned(self) -> None:
        if not self.pipeline.learning.enabled or not self.learned_path.is_file():
            return
        try:
            data = json.loads(self.learned_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("learned device normals in %s unreadable (%s): every device learns again", self.learned_path, exc)
            return
        log.info("learned device normals: %d device(s) restored from %s", self.pipeline.load_learned(data), self.learned_path)

    def save_learned(self) -> None:
        """Write the devices' learned normals (atomically: a crash mid-write keeps the previous file)."""
        pipeline = self.pipeline
        if pipeline is None or not pipeline.learning.enabled:
            return
        path = self.learned_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")  # the periodic job and stop() may both write
            tmp.write_text(json.dumps(pipeline.learned()), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write the learned device normals to %s: %s", path, exc)
