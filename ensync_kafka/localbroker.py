"""A real single-node Apache Kafka broker for development and tests, without Docker.

A start fetches Kafka's jars from Maven Central on first use (``_kafkadist``; later starts are
offline), formats a fresh KRaft log directory and runs ``kafka.Kafka`` in combined
broker+controller mode on free loopback ports.

Two ways to run one:

- ``LocalBroker().start()`` (what ``ensync-kafka broker start`` does): a detached daemon
  recorded in ``<home>/broker.json``; it outlives the starting process until ``stop()``.
- ``LocalBroker.ephemeral().start()`` (the test fixtures): a per-run home in a shared test
  registry, and a broker killed by the kernel when the starting process dies, even by SIGKILL.
  Each new ephemeral home first reaps what killed runs left behind.

Linux is the supported platform (``/proc`` and ``prctl``); elsewhere the daemon mode works with
``ps`` and the die-with-parent guarantee is reduced to the reaping on the next run.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._kafkadist import (
    JAVA_HINT,
    KAFKA_VERSION,
    LOCK_FILE,
    TOOL_JVM_OPTIONS,
    _classpath,
    _env,
    _log4j,
    _require,
    _user_home,
    cache_dir,
    ensure_jars,
    last_lines,
    render_server_properties,
)
from ._processes import (
    _POLL_S,
    KILL_WAIT_S,
    _alive,
    _answers,
    _die_with_parent,
    _free_ports,
    _is_kafka_under,
    _kafka_pids_under,
    _kill,
    _locked,
    _read_json,
    _start_ticks,
    _write_json,
)
from ._processes import _wait_gone as _wait_gone  # re-exported: the tests wait on brokers with it
from .exceptions import LocalBrokerError

__all__ = [
    "KAFKA_VERSION",
    "BrokerInfo",
    "LocalBroker",
    "cache_dir",
    "default_home",
    "ensure_jars",
    "ephemeral_home",
    "new_cluster_id",
    "reap_stale_test_brokers",
    "render_server_properties",
    "running_bootstrap",
]

DEFAULT_HEAP = "1g"
BROKER_JVM_OPTIONS = (
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
)
"""What Kafka's own kafka-server-start.sh runs the broker with (KAFKA_HEAP_OPTS, with -Xms equal to
-Xmx, and KAFKA_JVM_PERFORMANCE_OPTS). Without them the heap starts small and its young
generation with it: the broker then paused ~11 ms for a young collection 2-3 times a second
under the benchmark's load."""
DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_STOP_TIMEOUT_S = 30.0
FORMAT_TIMEOUT_S = 120.0
STARTED_MARKER = "Kafka Server started"
HOST = "127.0.0.1"

ENV_HOME = "ENSYNC_HOME"
STATE_FILE = "broker.json"
LOG_FILE = "broker.log"
OWNER_FILE = "owner.json"

_PORT_ATTEMPTS = 3
_UNOWNED_GRACE_S = 60.0


# --- locations -----------------------------------------------------------------------------


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$ENSYNC_HOME``, else ``${XDG_STATE_HOME:-~/.local/state}/ensync-kafka/broker``."""
    env = _env(environ)
    if env.get(ENV_HOME):
        return Path(env[ENV_HOME]).expanduser()
    if env.get("XDG_STATE_HOME"):
        base = Path(env["XDG_STATE_HOME"])
    else:
        base = _user_home(env) / ".local" / "state"
    return base / "ensync-kafka" / "broker"


def _test_registry() -> Path:
    return Path(tempfile.gettempdir()) / f"ensync-kafka-tests-{os.getuid()}"


# --- small helpers -----------------------------------------------------------------------------


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return last_lines(text) or "(empty log)"


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID, base64url without padding, like Kafka's ``Uuid``."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):
            return value


# --- the broker ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerInfo:
    """A broker this module started, as recorded in ``<home>/broker.json``."""

    pid: int
    bootstrap: str
    data_dir: Path
    log_file: Path
    started_at: datetime
    kafka_version: str = KAFKA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "bootstrap": self.bootstrap,
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "started_at": self.started_at.isoformat(),
            "kafka_version": self.kafka_version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BrokerInfo:
        """Raises ValueError (or KeyError/TypeError) on a malformed record."""
        return cls(
            pid=int(data["pid"]),
            bootstrap=str(data["bootstrap"]),
            data_dir=Path(data["data_dir"]),
            log_file=Path(data["log_file"]),
            started_at=datetime.fromisoformat(data["started_at"]),
            kafka_version=str(data.get("kafka_version", KAFKA_VERSION)),
        )


class _PortTaken(LocalBrokerError):
    """A port picked as free was taken before the broker bound it."""


class LocalBroker:
    """Start, inspect and stop the one local broker recorded in ``home``."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        cache: Path | None = None,
        heap: str = DEFAULT_HEAP,
        start_timeout: float = DEFAULT_START_TIMEOUT_S,
        die_with_parent: bool = False,
    ) -> None:
        # Absolute: the JVM runs in the data directory and must find its files from there.
        self.home = (Path(home) if home is not None else default_home()).expanduser().absolute()
        self.cache = cache
        self.heap = heap
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def ephemeral(cls, **kwargs: Any) -> LocalBroker:
        """A broker for one test session: a fresh registered home; killed when we die."""
        return cls(ephemeral_home(), die_with_parent=True, **kwargs)

    @property
    def state_file(self) -> Path:
        return self.home / STATE_FILE

    @property
    def log_file(self) -> Path:
        return self.home / LOG_FILE

    @property
    def previous_log_file(self) -> Path:
        """The log of the run before this one (a restart's)."""
        return self.home / f"{LOG_FILE}.1"

    # public operations

    def status(self) -> BrokerInfo | None:
        """The running broker, or None. A record whose process is gone is cleaned up."""
        info = self._read()
        if info is None:
            return None
        if not self._owns(info):
            self._forget(info, keep_data=False)
            return None
        return info if _answers(info.bootstrap) else None

    def start(self) -> tuple[BrokerInfo, bool]:
        """Start a broker, or report the running one: ``(info, started_now)``."""
        java = _require("java", JAVA_HINT)
        self.home.mkdir(parents=True, exist_ok=True)
        with _locked(self.home / LOCK_FILE):
            existing = self._read()
            if existing is not None:
                if self._owns(existing):
                    if _answers(existing.bootstrap):
                        return existing, False
                    _kill(
                        existing.pid, DEFAULT_STOP_TIMEOUT_S
                    )  # wedged, or half-started by a starter that died
                self._forget(existing, keep_data=False)
            libs = ensure_jars(self.cache)
            for _attempt in range(_PORT_ATTEMPTS):
                try:
                    return self._launch(java, libs), True
                except _PortTaken:
                    continue
            raise LocalBrokerError(f"no free loopback ports after {_PORT_ATTEMPTS} attempts")

    def stop(
        self, *, keep_data: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT_S
    ) -> BrokerInfo | None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout`` s); None if none ran.

        The data directory is removed unless ``keep_data``.
        """
        if not self.home.is_dir():
            return None
        with _locked(self.home / LOCK_FILE):
            info = self._read()
            if info is None:
                return None
            running = self._owns(info)
            if running:
                self._terminate(info, timeout)
            self._process = None
            self._forget(info, keep_data=keep_data)
            return info if running else None

    def restart(self, *, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> BrokerInfo:
        """Stop the broker (as :meth:`stop`) and run it again on the same data and ports.

        Topics, committed offsets and transactions survive, as across one broker's restart in
        a rolling upgrade; clients reconnect to the same address.
        """
        java = _require("java", JAVA_HINT)
        with _locked(self.home / LOCK_FILE):
            info = self._read()
            if info is None or not self._owns(info):
                raise LocalBrokerError(f"no local broker is running in {self.home}")
            self._terminate(info, timeout)
            self._process = None
            return self._run(
                java, ensure_jars(self.cache), info.data_dir, info.bootstrap, keep_data=True
            )

    # internals

    def _terminate(self, info: BrokerInfo, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; reaped here when we started it."""
        if self._process is not None and self._process.pid == info.pid:
            stop_node_process(self._process, timeout)
        else:
            _kill(info.pid, timeout)

    def _read(self) -> BrokerInfo | None:
        data = _read_json(self.state_file)
        if data is None:
            if self.state_file.exists():  # unreadable: nothing can be trusted in it
                self.state_file.unlink(missing_ok=True)
            return None
        try:
            return BrokerInfo.from_json(data)
        except (KeyError, TypeError, ValueError):
            self.state_file.unlink(missing_ok=True)
            return None

    def _owns(self, info: BrokerInfo) -> bool:
        return _is_kafka_under(info.pid, info.data_dir)

    def _forget(self, info: BrokerInfo, *, keep_data: bool) -> None:
        current = self._read_raw_pid()
        if current in (None, info.pid):
            self.state_file.unlink(missing_ok=True)
        # Never delete outside our home, whatever a (possibly edited) broker.json says.
        inside = info.data_dir.resolve().is_relative_to(self.home.resolve())
        if not keep_data and inside and info.data_dir.resolve() != self.home.resolve():
            shutil.rmtree(info.data_dir, ignore_errors=True)

    def _read_raw_pid(self) -> int | None:
        data = _read_json(self.state_file)
        pid = data.get("pid") if data else None
        return pid if isinstance(pid, int) else None

    def _launch(self, java: str, libs: Path) -> BrokerInfo:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        data_dir = self.home / f"data-{stamp}-{uuid.uuid4().hex[:6]}"
        data_dir.mkdir(parents=True)
        broker_port, controller_port = _free_ports(HOST, 2)
        properties = data_dir / "server.properties"
        try:
            properties.write_text(
                render_server_properties(
                    host=HOST,
                    broker_port=broker_port,
                    controller_port=controller_port,
                    log_dir=data_dir / "log",
                )
            )
            format_storage(java, libs, properties, new_cluster_id())
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        return self._run(java, libs, data_dir, f"{HOST}:{broker_port}", keep_data=False)

    def _run(
        self, java: str, libs: Path, data_dir: Path, bootstrap: str, *, keep_data: bool
    ) -> BrokerInfo:
        """Run ``kafka.Kafka`` on the formatted ``data_dir`` until it serves clients."""
        process = spawn_node(
            broker_command(java, libs, self.heap, data_dir / "server.properties"),
            data_dir,
            self.log_file,
            die_with_parent=self.die_with_parent,
        )
        info = BrokerInfo(
            pid=process.pid,
            bootstrap=bootstrap,
            data_dir=data_dir,
            log_file=self.log_file,
            started_at=datetime.now(UTC),
        )
        _write_json(self.state_file, info.to_json())  # before waiting: a killed start is found
        try:
            await_started(process, self.log_file, bootstrap, self.start_timeout)
        except BaseException:
            stop_node_process(process, KILL_WAIT_S)
            self._forget(info, keep_data=keep_data)
            raise
        self._process = process
        return info


# --- one node's process: shared with localcluster ------------------------------------------


def broker_command(java: str, libs: Path, heap: str, properties: Path) -> list[str]:
    return [
        java, f"-Xms{heap}", f"-Xmx{heap}", *BROKER_JVM_OPTIONS, _log4j(),
        "-cp", _classpath(libs), "kafka.Kafka", str(properties),
    ]  # fmt: skip


def spawn_node(
    command: list[str], data_dir: Path, log_file: Path, *, die_with_parent: bool
) -> subprocess.Popen[bytes]:
    """Start a node's JVM in its own session, logging to ``log_file``; the log of the run before
    is kept beside it (a restart's cause is there)."""
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))
    with log_file.open("wb") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
            preexec_fn=_die_with_parent() if die_with_parent else None,
        )


def format_storage(java: str, libs: Path, properties: Path, cluster_id: str) -> None:
    command = [
        java, *TOOL_JVM_OPTIONS, _log4j(),
        "-cp", _classpath(libs), "kafka.tools.StorageTool", "format",
        "-t", cluster_id, "-c", str(properties),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise LocalBrokerError(f"formatting broker storage took over {exc.timeout} s") from exc
    if result.returncode != 0:
        output = last_lines(result.stdout + result.stderr)
        raise LocalBrokerError(f"formatting the broker storage failed:\n{output}")


def await_started(
    process: subprocess.Popen[bytes], log_file: Path, bootstrap: str, timeout: float
) -> None:
    """Until the node logs that it started and answers a metadata request at ``bootstrap``."""
    deadline = time.monotonic() + timeout
    marker = STARTED_MARKER.encode()
    window = b""
    with log_file.open("rb") as log:
        while True:
            window = window[-len(marker) :] + log.read()
            if marker in window:
                break
            if process.poll() is not None:
                text = _tail(log_file)
                if "Address already in use" in text:
                    raise _PortTaken()
                raise LocalBrokerError(
                    f"the broker exited with code {process.returncode} while starting; "
                    f"last lines of {log_file}:\n{text}"
                )
            if time.monotonic() >= deadline:
                raise LocalBrokerError(
                    f"the broker did not start within {timeout:.0f} s; "
                    f"last lines of {log_file}:\n{_tail(log_file)}"
                )
            time.sleep(_POLL_S)
    _confirm(bootstrap, max(5.0, deadline - time.monotonic()))


def stop_node_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a controlled shutdown), then SIGKILL after ``timeout`` s; reaped."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(KILL_WAIT_S)


def _confirm(bootstrap: str, timeout: float) -> None:
    """A metadata request through the Admin API: the broker serves clients, not just TCP."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise LocalBrokerError(
            f"the broker at {bootstrap} started but did not answer a metadata request: {exc}"
        ) from exc


# --- test sessions -------------------------------------------------------------------------


def ephemeral_home() -> Path:
    """A new per-run broker home in the test registry, owned by this process.

    Reaps the homes of owners that died first, so a killed test run leaves nothing behind
    that the next run could trip over.
    """
    reap_stale_test_brokers()
    registry = _test_registry()
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=registry))
    _write_json(home / OWNER_FILE, {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid())})
    return home


def _owner_alive(owner: Mapping[str, Any]) -> bool:
    pid, ticks = owner.get("pid"), owner.get("start_ticks")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    return ticks is None or _start_ticks(pid) in (None, ticks)  # a reused pid is not the owner


def reap_stale_test_brokers(registry: Path | None = None) -> list[Path]:
    """Kill the brokers of test runs whose owner died, delete their homes; return the homes."""
    registry = _test_registry() if registry is None else registry
    reaped: list[Path] = []
    if not registry.is_dir():
        return reaped
    for home in sorted(registry.glob("run-*")):
        owner = _read_json(home / OWNER_FILE)
        if owner is None:
            with contextlib.suppress(OSError):  # just created: the owner file follows at once
                if time.time() - home.stat().st_mtime < _UNOWNED_GRACE_S:
                    continue
        elif _owner_alive(owner):
            continue
        pids = set(_kafka_pids_under(home))
        record = _read_json(home / STATE_FILE)
        if record and isinstance(record.get("pid"), int) and _is_kafka_under(record["pid"], home):
            pids.add(record["pid"])
        for pid in sorted(pids):
            with contextlib.suppress(LocalBrokerError):
                _kill(pid, timeout=KILL_WAIT_S)
        shutil.rmtree(home, ignore_errors=True)
        reaped.append(home)
    return reaped


def running_bootstrap() -> str | None:
    """The bootstrap addresses of the broker or cluster ``ensync-kafka broker start`` runs, or
    None."""
    from .localcluster import LocalCluster  # it builds on this module

    try:
        cluster = LocalCluster.running(default_home())
        if cluster is not None:
            return cluster.bootstrap
        info = LocalBroker().status()
    except (OSError, LocalBrokerError):
        return None
    return info.bootstrap if info else None
