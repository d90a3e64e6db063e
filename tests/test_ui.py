"""The MLflow UI over a sqlite store: the REST API and the rendered run page show our metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from pdl1exp.tracking import setup, tracked_run

METRICS = {"test_auc": 0.8125, "test_sensitivity": 0.6875}
START_TIMEOUT_S = 120
BROWSER_TIMEOUT_S = 120
# Requests to the loopback server must not go through a configured proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Server:
    url: str
    experiment_id: str
    run_id: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with _OPENER.open(url, timeout=10) as response:
        return response.read()


def _wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            if _get(f"{url}/health"):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mlflow server` on a free loopback port over a tmp store holding one small run."""
    root = tmp_path_factory.mktemp("ui")
    store = f"sqlite:///{root}/mlflow.db"
    experiment_id = setup(store, "ui")
    with tracked_run("tiny") as run:
        mlflow.log_metrics(METRICS)
        mlflow.log_param("classifier", "lr")
    port = _free_port()
    log = root / "server.log"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with log.open("w") as sink:
        # Its own session, so the server and its workers are stopped together.
        process = subprocess.Popen(
            [str(mlflow_cli), "server", "--backend-store-uri", store, "--default-artifact-root",
             str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, process, log)
        yield Server(url, experiment_id, run.info.run_id)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.mark.slow
def test_rest_api_serves_the_run_metrics(server: Server) -> None:
    reply = json.loads(_get(f"{server.url}/api/2.0/mlflow/runs/get?run_id={server.run_id}"))
    metrics = {m["key"]: m["value"] for m in reply["run"]["data"]["metrics"]}
    assert metrics == METRICS
    assert reply["run"]["info"]["status"] == "FINISHED"


@pytest.mark.slow
def test_run_page_renders_the_metrics_in_a_headless_browser(server: Server,
                                                           tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = f"{server.url}/#/experiments/{server.experiment_id}/runs/{server.run_id}"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-proxy-server", f"--user-data-dir={tmp_path / 'profile'}",
         # Let the single-page app fetch the run and render before the DOM is dumped.
         "--virtual-time-budget=20000", "--dump-dom", page],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, value in METRICS.items():
        assert name in done.stdout
        assert f">{value}<" in done.stdout
