"""``headwater serve``: gateway worker processes, the pipeline, deliveries and the console.

The main process binds the listening socket, starts the gateway workers
(each a uvicorn server with its own group-committing log writer), and runs
the pipeline, the delivery loops and the console (with its admin API)
itself.  SIGINT or SIGTERM stops the workers first (they finish in-flight
requests and flush the log), then the pipeline.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from headwater import backends, config, destinations
from headwater.console.alerts import AlertLoop
from headwater.console.server import Console, ConsoleServer
from headwater.destinations.delivery import DeliveryWorker
from headwater.log.base import Record
from headwater.log.rejections import Rejected
from headwater.metrics import report
from headwater.pipeline.runner import Pipeline

log = logging.getLogger("headwater.serve")
SHUTDOWN_GRACE_S = 12.0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_worker(data_dir: str, sock: socket.socket) -> None:
    """One gateway process (the target of each worker)."""
    import uvicorn

    from headwater.gateway.app import Gateway
    from headwater.gateway.committer import Committer

    parent = os.getppid()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    directory = Path(data_dir)
    settings = config.load(directory)
    committer = Committer(
        backends.log_writer_factory(settings, directory), settings.server.max_pending_bytes
    )
    app = Gateway(directory, settings, committer)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level="warning",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    )
    watch = threading.Thread(
        target=_stop_with_parent, args=(server, parent), name="parent-watch", daemon=True
    )
    watch.start()
    server.run(sockets=[sock])


def _stop_with_parent(server: Any, parent: int) -> None:
    # A worker whose serve process died (kill -9, OOM) would keep the port and
    # acknowledge events with no pipeline behind it; finish and exit instead.
    while os.getppid() == parent:
        time.sleep(0.5)
    log.error("serve process %s is gone; gateway worker stopping", parent)
    server.should_exit = True
    # Nothing unacknowledged is at stake (a 200 follows the durable append), so a
    # shutdown that hangs is cut short rather than left holding the port.
    time.sleep(SHUTDOWN_GRACE_S)
    log.error("gateway worker did not stop within %s s; exiting", SHUTDOWN_GRACE_S)
    os._exit(1)


class Server:
    def __init__(
        self,
        data_dir: Path,
        host: str | None = None,
        port: int | None = None,
        workers: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.settings = config.load(data_dir)
        server = self.settings.server
        self.host = host or server.host
        self.port = server.port if port is None else port
        self.workers = workers or server.workers
        self.stop = threading.Event()
        self._procs: list[BaseProcess] = []

    def _spawn(self, sock: socket.socket) -> BaseProcess:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=run_worker, args=(str(self.data_dir), sock), daemon=False)
        proc.start()
        return proc

    def run(self) -> int:
        try:
            sock = bind(self.host, self.port)
        except OSError as exc:
            raise config.ConfigError(
                f"server.port: cannot listen on {self.host}:{self.port} ({exc.strerror})"
            ) from None
        self.port = sock.getsockname()[1]
        store = backends.open_store(self.settings, self.data_dir)
        consumer = backends.open_raw_consumer(self.settings, self.data_dir, store)
        processed = backends.open_processed_writer(self.settings, self.data_dir)
        pipeline = Pipeline(self.settings, consumer, store, processed, quarantine=self._quarantine)
        delivery_stop = threading.Event()
        workers = start_deliveries(self.data_dir, self.settings, delivery_stop)
        console = Console(self.data_dir, self.settings, store, pipeline, workers)
        console.public_port = self.port
        console_settings = self.settings.console
        try:
            admin = ConsoleServer(console, console_settings.host, console_settings.port)
        except OSError as exc:
            sock.close()
            raise config.ConfigError(
                f"console.port: cannot listen on {console_settings.host}:"
                f"{console_settings.port} ({exc.strerror})"
            ) from None
        alerts = AlertLoop(
            lambda: report.anomalies(
                console.report_inputs(), _now_ms(), self.settings.report.anomaly_z
            ),
            self.settings.report.alert_webhook,
            delivery_stop,
        )
        pipeline_stop = threading.Event()
        pipeline_thread = threading.Thread(
            target=pipeline.run, args=(pipeline_stop,), name="pipeline", daemon=True
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        self._procs = [self._spawn(sock) for _ in range(self.workers)]
        pipeline_thread.start()
        admin.start()
        alerts.start()
        self._write_run_file(admin.port)
        print(
            f"headwater listening on http://{_url_host(self.host)}:{self.port}"
            f" ({self.workers} gateway workers, data in {self.data_dir})",
            file=sys.stderr,
            flush=True,
        )
        print(
            f"console on http://{_url_host(self.settings.console.host)}:{admin.port}/"
            " (sign in with console.admin_token from headwater.toml)",
            file=sys.stderr,
            flush=True,
        )
        try:
            while not self.stop.wait(1.0):
                for index, proc in enumerate(self._procs):
                    if not proc.is_alive():
                        log.error(
                            "gateway worker %s exited (%s); restarting", proc.pid, proc.exitcode
                        )
                        self._procs[index] = self._spawn(sock)
        finally:
            for proc in self._procs:
                proc.terminate()
            for proc in self._procs:
                proc.join(15)
                if proc.is_alive():
                    proc.kill()
            sock.close()
            pipeline_stop.set()
            pipeline_thread.join(30)
            delivery_stop.set()
            for worker in workers:
                worker.join(30)
            admin.stop()
            (self.data_dir / "run" / "serve.json").unlink(missing_ok=True)
            consumer.close()
            processed.close()
            store.close()
        print("headwater stopped", file=sys.stderr, flush=True)
        return 0

    def _quarantine(self, record: Record, error: str) -> None:
        """Keep a log record the store refused, with the error, where refusals are kept."""
        rejections = backends.rejection_log(self.settings, self.data_dir)
        try:
            rejections.record(
                [
                    Rejected(
                        record.received_ms,
                        record.source,
                        "pipeline",
                        500,
                        "pipeline_error",
                        "",
                        error,
                        record.payload,
                    )
                ]
            )
        finally:
            rejections.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop.set()

    def _write_run_file(self, admin_port: int) -> None:
        info = {"host": self.host, "port": self.port, "console_port": admin_port}
        path = self.data_dir / "run" / "serve.json"
        path.write_text(json.dumps(info))


def start_deliveries(
    data_dir: Path, settings: config.Settings, stop: threading.Event
) -> list[DeliveryWorker]:
    """Build every enabled destination (errors name the setting) and start its loop."""
    workers: list[DeliveryWorker] = []
    for destination_config in settings.destinations:
        if not destination_config.enabled:
            continue
        try:
            destination = destinations.build(destination_config, data_dir)
        except destinations.ConfigurationError as exc:
            raise config.ConfigError(str(exc)) from None
        workers.append(backends.delivery_worker(settings, data_dir, destination, stop))
    for worker in workers:
        worker.start()
    return workers


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
