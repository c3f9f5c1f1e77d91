"""The trainer's Prometheus endpoint: rank 0's metrics, and the launcher's gateway that holds the pod's port.

torchrun starts the ranks of a multi-node run only once every node has joined its rendezvous, and rank 0
forms the process group before it can serve anything: a Master pod whose workers cannot start yet (not
schedulable, pulling their image) would be a scrape target that is down. So the launcher
(`finetune_trainer.launch`) binds the pod's metrics port from the container's start to its end. Rank 0
serves its registry on localhost, on a port the launcher chose (FINETUNE_TRAINER_METRICS_PORT and
FINETUNE_TRAINER_METRICS_ADDRESS in its environment), and the gateway relays it once it answers; until
then the gateway serves its own registry, `finetune_trainer_phase{phase="initializing"}` and the
launcher's process metrics, with no progress gauges (no progress yet).

Only prometheus_client and the standard library here: the launcher does not import torch.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.exposition import choose_encoder

METRICS_PORT_ENV = "FINETUNE_TRAINER_METRICS_PORT"
METRICS_ADDRESS_ENV = "FINETUNE_TRAINER_METRICS_ADDRESS"
ALL_INTERFACES = "0.0.0.0"
LOCALHOST = "127.0.0.1"

# finetune_trainer_phase: what the trainer of the pod does.
INITIALIZING = "initializing"  # the launcher waits for the rendezvous and rank 0 (no progress yet)
RUNNING = "running"  # rank 0 serves its metrics: it formed the process group and works on the run
EXITING = "exiting"  # rank 0 has closed its endpoint: the run ends in this pod
PHASES = (INITIALIZING, RUNNING, EXITING)

# How long the gateway waits for rank 0's answer (Prometheus' default scrape timeout is 10 s).
UPSTREAM_TIMEOUT_SECONDS = 5.0


def metrics_port(configured: int) -> int:
    override = os.environ.get(METRICS_PORT_ENV)
    return int(override) if override not in (None, "") else configured


def metrics_address() -> str:
    return os.environ.get(METRICS_ADDRESS_ENV) or ALL_INTERFACES


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class PhaseGauge:
    """finetune_trainer_phase{phase}: 1 for the current phase, 0 for the others (as finetune_job_phase)."""

    def __init__(self, registry: CollectorRegistry, phase: str):
        self.gauge = Gauge("finetune_trainer_phase", "What the trainer of this pod does: 1 for the current phase "
                           "(initializing: waiting for the other pods and the process group; running; exiting), "
                           "0 for the others.", ["phase"], registry=registry)
        self.set(phase)

    def set(self, phase: str) -> None:
        for p in PHASES:
            self.gauge.labels(p).set(1 if p == phase else 0)


class Metrics:
    """Rank 0's Prometheus metrics in their own registry (several runs in one test process must not clash)."""

    def __init__(self, port: int, address: str | None = None):
        self.registry = _registry()
        gauge = lambda name, doc: Gauge(f"finetune_trainer_{name}", doc, registry=self.registry)  # noqa: E731
        self.phase = PhaseGauge(self.registry, RUNNING)
        self.step = gauge("step", "Optimizer steps done in the current stage.")
        self.total_steps = gauge("total_steps", "Optimizer steps of the current stage.")
        self.loss = gauge("loss", "Training loss (mean over the last optimizer step).")
        self.eval_loss = gauge("eval_loss", "Validation loss.")
        self.learning_rate = gauge("learning_rate", "Current learning rate.")
        self.tokens_per_second = gauge("tokens_per_second", "Training tokens per second, all ranks together.")
        self.eta_seconds = gauge("eta_seconds", "Estimated seconds until the stage ends.")
        self.checkpoints = Counter("finetune_trainer_checkpoints", "Checkpoints this process saved.",
                                   registry=self.registry)
        # The process start before the first checkpoint: a restarted trainer is not "stale" at once
        # (the counter starts again at 0, so alerting on its increase would be).
        self.last_checkpoint = gauge("last_checkpoint_timestamp_seconds", "When this process saved its latest "
                                     "checkpoint (Unix time), or when it started before its first one.")
        self.last_checkpoint.set_to_current_time()
        self.server = None
        if port:
            self.server, _ = start_http_server(port, addr=address or metrics_address(), registry=self.registry)

    def checkpoint_saved(self) -> None:
        self.checkpoints.inc()
        self.last_checkpoint.set_to_current_time()

    def update(self, p) -> None:
        """From a config.Progress."""
        self.step.set(p.step)
        self.total_steps.set(p.totalSteps)
        for gauge, value in ((self.loss, p.loss), (self.eval_loss, p.evalLoss), (self.learning_rate, p.learningRate),
                             (self.tokens_per_second, p.tokensPerSecond), (self.eta_seconds, p.etaSeconds)):
            if value is not None:
                gauge.set(value)

    def close(self) -> None:
        """Stop serving and release the port (the gateway then sees that rank 0 is gone)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def gateway_port(environ: dict[str, str]) -> int:
    """The port the launcher of this pod binds: FINETUNE_TRAINER_METRICS_PORT (the operator sets it) in the
    pod of global rank 0, node rank 0 (PET_NODE_RANK, the Master's), else 0: no gateway."""
    port = (environ.get(METRICS_PORT_ENV) or "").strip()
    if environ.get("PET_NODE_RANK", "0") not in ("", "0") or not port.isdigit():
        return 0
    return int(port)


class MetricsGateway:
    """The pod's metrics port, held by the launcher: rank 0's endpoint relayed, or the launcher's own registry."""

    def __init__(self, port: int, address: str = ALL_INTERFACES, upstream_timeout: float = UPSTREAM_TIMEOUT_SECONDS):
        self.upstream_port = free_local_port()
        self.upstream_timeout = upstream_timeout
        self.registry = _registry()
        self.phase = PhaseGauge(self.registry, INITIALIZING)
        self._rank0_answered = False
        self.server = ThreadingHTTPServer((address, port), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="metrics-gateway")
        self._thread.start()

    def trainer_env(self) -> dict[str, str]:
        """What rank 0 needs in its environment to serve where the gateway relays from."""
        return {METRICS_PORT_ENV: str(self.upstream_port), METRICS_ADDRESS_ENV: LOCALHOST}

    def scrape(self, path: str, accept: str) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) of one scrape."""
        try:
            return self._relay(path, accept)
        except ConnectionRefusedError:  # nothing listens: rank 0 has not started serving, or has stopped
            self.phase.set(EXITING if self._rank0_answered else INITIALIZING)
            encoder, content_type = choose_encoder(accept)
            return 200, content_type, encoder(self.registry)
        except (OSError, http.client.HTTPException) as e:  # rank 0 serves but did not answer: a failed scrape
            return 503, "text/plain; charset=utf-8", f"rank 0's metrics endpoint did not answer: {e}\n".encode()

    def _relay(self, path: str, accept: str) -> tuple[int, str, bytes]:
        connection = http.client.HTTPConnection(LOCALHOST, self.upstream_port, timeout=self.upstream_timeout)
        try:
            connection.request("GET", path, headers={"Accept": accept} if accept else {})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        self._rank0_answered = True
        return response.status, response.getheader("Content-Type") or "text/plain", body

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(gateway: MetricsGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status, content_type, body = gateway.scrape(self.path, self.headers.get("Accept", ""))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            pass  # one line per scrape would bury the trainer's own output

    return Handler


def start_gateway(environ: dict[str, str]) -> MetricsGateway | None:
    """The launcher's gateway in the pod of rank 0; None elsewhere, with the port off, or if it cannot bind
    (rank 0 then binds the port itself, as without the launcher)."""
    port = gateway_port(environ)
    if not port:
        return None
    try:
        return MetricsGateway(port)
    except OSError as e:
        print(f"finetune_trainer.launch: cannot bind the metrics port {port} ({e}); rank 0 serves it once it runs",
              file=sys.stderr)
        return None
