"""Kafka's own jars and config for the local broker: the jars fetched once from Maven Central.

Kafka is not packaged for Debian or PyPI, but its jars are on Maven Central: ``ops/kafka/pom.xml``
names them, Maven copies them into a cache outside the repository on first use, and every later
start is offline. The broker's ``server.properties`` template and logging config sit beside the POM.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template

from ._processes import _locked
from .exceptions import LocalBrokerError

KAFKA_VERSION = "4.4.0"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
FETCH_TIMEOUT_S = 900.0
ENV_CACHE = "ENSYNC_KAFKA_CACHE"
LOCK_FILE = ".lock"
LOG_TAIL_LINES = 25
MAX_REPLICATION = 3
"""A local cluster replicates internal topics (and topics by default) to at most 3 nodes."""
"""How many lines of a failed tool's output, or of the broker's log, an error quotes."""

_LIBS = "libs"
_LIBS_STAMP = ".ensync-complete"
_EXPECTED_JARS = ("kafka_2.13-*.jar", "kafka-tools-*.jar")
_MVN_HINT = "install Apache Maven (e.g. `apt-get install maven`), needed once to fetch Kafka jars"
JAVA_HINT = "install a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)"
KAFKA_TOOLS = {
    "transactions": "org.apache.kafka.tools.TransactionsCommand",
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "dump-log": "org.apache.kafka.tools.DumpLogSegments",
}
"""Kafka's own command-line tools, by the name of their script (``kafka-<name>.sh``), fetched
with the broker's jars: the remedies ``topics hanging`` prints need no Kafka download."""
TOOL_JVM_OPTIONS = ("-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
"""A short-lived JVM: small heap, quick start."""


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _user_home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$ENSYNC_KAFKA_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/ensync-kafka/kafka-4.4.0``."""
    env = _env(environ)
    if env.get(ENV_CACHE):
        return Path(env[ENV_CACHE]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else _user_home(env) / ".cache"
    return base / "ensync-kafka" / f"kafka-{KAFKA_VERSION}"


def _ops_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "ops" / "kafka", here.parent / "ops" / "kafka"):
        if (candidate / "pom.xml").is_file():
            return candidate
    raise LocalBrokerError(f"ops/kafka (the broker POM and config) not found near {here}")


def _require(program: str, hint: str) -> str:
    found = shutil.which(program)
    if not found:
        raise LocalBrokerError(f"`{program}` not found on PATH: {hint}")
    return found


def ensure_jars(cache: Path | None = None) -> Path:
    """The directory of broker jars, fetched with Maven on first use; later calls are offline.

    The fetch writes into a temporary directory renamed into place once complete, so an
    interrupted fetch never leaves a half cache. A changed POM triggers a new fetch.
    """
    cache = (cache_dir() if cache is None else cache).expanduser().absolute()
    pom = _ops_dir() / "pom.xml"
    key = hashlib.sha256(pom.read_bytes()).hexdigest()
    libs = cache / _LIBS

    def complete() -> bool:
        with contextlib.suppress(OSError):
            return (libs / _LIBS_STAMP).read_text().strip() == key
        return False

    if complete():
        return libs
    with _locked(cache / LOCK_FILE):
        if complete():
            return libs
        mvn = _require("mvn", _MVN_HINT)
        for leftover in cache.glob(".libs-*"):  # from fetches that were killed
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=cache))
        try:
            command = [
                mvn, "-q", "-B", "-f", str(pom), f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
            ]  # fmt: skip
            try:
                result = subprocess.run(
                    command, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S
                )
            except subprocess.TimeoutExpired as exc:
                raise LocalBrokerError(
                    f"fetching the Kafka {KAFKA_VERSION} jars took over {FETCH_TIMEOUT_S:.0f} s"
                ) from exc
            if result.returncode != 0:
                output = last_lines(result.stdout + result.stderr)
                raise LocalBrokerError(
                    f"fetching the Kafka {KAFKA_VERSION} jars with Maven failed "
                    f"(exit {result.returncode}):\n{output}"
                )
            missing = [jar for jar in _EXPECTED_JARS if not any(tmp.glob(jar))]
            if missing:
                raise LocalBrokerError(f"Maven finished but fetched no {missing[0]} into {tmp}")
            (tmp / _LIBS_STAMP).write_text(key)
            if libs.exists():
                old = cache / f".libs-old-{uuid.uuid4().hex[:8]}"
                libs.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(libs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return libs


def render_server_properties(
    *,
    host: str,
    broker_port: int,
    controller_port: int,
    log_dir: Path,
    node_id: int = 1,
    controllers: Mapping[int, int] | None = None,
) -> str:
    """``ops/kafka/server.properties.template`` filled in for one node.

    ``controllers`` maps every node id of a cluster to its controller port (all on ``host``);
    without it the node is a cluster of its own. Replication follows the cluster's size: 1 for
    one node, else up to 3 with a minimum ISR one below it.
    """
    voters = controllers if controllers is not None else {node_id: controller_port}
    if voters.get(node_id) != controller_port:
        raise ValueError(f"node {node_id} is not a voter on port {controller_port}: {voters}")
    replication = min(len(voters), MAX_REPLICATION)
    template = Template((_ops_dir() / "server.properties.template").read_text())
    return template.substitute(
        host=host,
        broker_port=broker_port,
        controller_port=controller_port,
        log_dir=log_dir,
        node_id=node_id,
        voters=",".join(f"{n}@{host}:{port}" for n, port in sorted(voters.items())),
        replication=replication,
        min_isr=max(1, replication - 1),
    )


def tool_command(name: str, args: Sequence[str], cache: Path | None = None) -> list[str]:
    """The command line that runs Kafka's tool ``name`` (a key of KAFKA_TOOLS) with ``args``,
    against any cluster the arguments name."""
    java = _require("java", JAVA_HINT)
    main = KAFKA_TOOLS[name]
    return [java, *TOOL_JVM_OPTIONS, _log4j(), "-cp", _classpath(ensure_jars(cache)), main, *args]


def _classpath(libs: Path) -> str:
    return f"{libs}{os.sep}*"


def _log4j() -> str:
    return f"-Dlog4j2.configurationFile={_ops_dir() / 'log4j2.yaml'}"


def last_lines(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
