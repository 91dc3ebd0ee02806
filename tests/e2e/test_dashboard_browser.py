"""The dashboard renders upcoming deliveries in a real browser: headless Chromium (Debian's
``chromium`` package), against a worker's own HTTP server on a real broker. The screenshot is
kept in ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ensync_kafka import DeferClient, Worker, ensure_topics
from ensync_kafka.config import config_from_mapping

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
BROWSER_TIMEOUT_S = 90.0
WAIT_S = 30.0


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "headless Chromium is needed for the dashboard test: apt-get install -y chromium",
        pytrace=False,
    )


def _browse(browser: str, profile: Path, url: str, *args: str) -> str:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        *args,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_dashboard_shows_upcoming_deliveries_in_chromium(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    browser = _chromium()
    config = config_from_mapping(
        {
            "prefix": unique_prefix,
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "tiers": {"1m": "1m", "1h": "1h"},
            "topics": {"defer": {"partitions": 2}},
            "worker": {"id": "dash-w", "state_dir": str(tmp_path / "state")},
            "monitor": {"port": "auto"},
        },
        environ={},
    )
    assert ensure_topics(config).ok
    worker = Worker(config)
    assert worker.monitor is not None
    url = f"http://127.0.0.1:{worker.monitor.port}/"
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        with DeferClient(config) as client:
            names = ["invoice.reminder", "trial.expiry", "cart.abandoned"]
            ids = [
                client.defer(name, {"n": i}, delay=40 + 600 * i, priority=5 - i,
                             reason=f"dashboard demo {i}").defer_id
                for i, name in enumerate(names)
            ]  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while True:  # the API lists them before the browser is asked
            with urllib.request.urlopen(url + "api/v1/upcoming", timeout=5) as response:
                listed = [i["defer_id"] for i in json.load(response)["items"]]
            if listed == ids:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"upcoming API lists {listed}, expected {ids}")
            time.sleep(0.2)

        dom = _browse(browser, tmp_path / "profile", url, "--dump-dom")
        assert 'data-loaded="true"' in dom, dom[-3000:]
        positions = [dom.find(defer_id) for defer_id in ids]
        assert all(p > 0 for p in positions), dom[-3000:]
        assert positions == sorted(positions), "upcoming deliveries are not in due order"
        for name in names:
            assert name in dom
        assert "dash-w" in dom  # the workers table

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        _browse(browser, tmp_path / "profile", url, f"--screenshot={shot}",
                "--window-size=1400,1000")  # fmt: skip
        assert shot.exists() and shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        worker.stop()
        thread.join(60)
    assert not worker.errors
