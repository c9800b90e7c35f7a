"""Real Prometheus peers for the metrics tests: a Prometheus server and a Pushgateway
(Debian's `prometheus` and `prometheus-pushgateway`), each started on loopback in a temp
folder and stopped by the test, and a tiny HTTP server that serves a textfile the way
node_exporter's textfile collector would."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import require_peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def _wait_ready(proc: subprocess.Popen[bytes], url: str, *, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited with {proc.returncode}")
        try:
            get(url, timeout=1.0)
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise AssertionError(f"{url} not ready within {within:g} s")


@contextmanager
def _running(args: list[str], ready: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, ready)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def pushgateway(tmp: Path) -> Iterator[str]:
    """A Pushgateway on loopback; yields its host:port."""
    exe = require_peer("prometheus-pushgateway")["prometheus-pushgateway"]
    where = f"127.0.0.1:{free_port()}"
    # in memory only: Debian's default persists to /var/lib/prometheus
    with _running([exe, f"--web.listen-address={where}", "--persistence.file="],
                  f"http://{where}/-/ready", tmp / "pushgateway.log"):
        yield where


@contextmanager
def serve_file(path: Path) -> Iterator[str]:
    """Serve `path` at /metrics (node_exporter's textfile collector stands here)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = json.loads(get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr})))
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_for(self, expr: str, *, series: int = 1, within: float = 15.0
                 ) -> list[dict[str, Any]]:
        """The result of `expr` once it has `series` series (scrapes and rule evaluations
        run every second), or what it has when `within` seconds are up."""
        deadline = time.monotonic() + within
        while True:
            found = self.query(expr)
            if len(found) >= series or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@contextmanager
def prometheus(tmp: Path, targets: dict[str, str], *, rules: Path | None = None
               ) -> Iterator[Prometheus]:
    """A Prometheus server on loopback scraping each {job: host:port} every second (labels
    of pushed series kept: honor_labels), evaluating `rules` every second."""
    exe = require_peer("prometheus")["prometheus"]
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)] if rules else [],
        "scrape_configs": [{"job_name": job, "honor_labels": True,
                            "static_configs": [{"targets": [where]}]}
                           for job, where in targets.items()],
    }))
    where = f"127.0.0.1:{free_port()}"
    with _running([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                   f"--web.listen-address={where}", "--log.level=warn"],
                  f"http://{where}/-/ready", tmp / "prometheus.log"):
        yield Prometheus(f"http://{where}")
