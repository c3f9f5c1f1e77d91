"""The trainer's Prometheus metrics (rank 0): the checkpoint clock that FineTuneJobCheckpointStale
reads starts at the process' start, so a restarted trainer is not stale, and moves with each save;
the launcher's gateway holds the pod's port before rank 0 exists and relays rank 0 once it serves."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

from finetune_trainer.config import Progress
from finetune_trainer.metrics import METRICS_ADDRESS_ENV, PHASES, MetricsGateway, free_local_port, metrics_port
from finetune_trainer.progress import Metrics


def test_the_checkpoint_clock_starts_with_the_process_and_moves_with_each_checkpoint():
    before = time.time()
    metrics = Metrics(port=0)
    value = metrics.registry.get_sample_value
    started = value("finetune_trainer_last_checkpoint_timestamp_seconds")
    assert before <= started <= time.time()
    assert value("finetune_trainer_checkpoints_total") == 0
    time.sleep(0.01)
    metrics.checkpoint_saved()
    metrics.checkpoint_saved()
    assert value("finetune_trainer_checkpoints_total") == 2
    assert started < value("finetune_trainer_last_checkpoint_timestamp_seconds") <= time.time()


def test_progress_sets_the_gauges_it_has_values_for():
    metrics = Metrics(port=0)
    metrics.update(Progress(step=10, totalSteps=100, loss=1.5, tokensPerSecond=1000.0))
    value = metrics.registry.get_sample_value
    assert (value("finetune_trainer_step"), value("finetune_trainer_total_steps")) == (10, 100)
    assert (value("finetune_trainer_loss"), value("finetune_trainer_tokens_per_second")) == (1.5, 1000.0)
    assert value("finetune_trainer_eval_loss") == 0  # not reported yet: the gauge's initial value


def test_the_trainer_exports_its_process_metrics():
    names = {sample.name for family in Metrics(port=0).registry.collect() for sample in family.samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names


# ---- the launcher's gateway: the pod's port from the start, rank 0's metrics once it serves -------

def _scrape(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _phase(text: str) -> str:
    return next(p for p in PHASES if f'finetune_trainer_phase{{phase="{p}"}} 1.0' in text)


def test_the_gateway_serves_the_initializing_trainer_then_relays_rank_0_until_it_stops(monkeypatch):
    gateway = MetricsGateway(port=0, address="127.0.0.1")
    try:
        status, text = _scrape(gateway.port)
        assert (status, _phase(text)) == (200, "initializing")
        assert "process_cpu_seconds_total" in text and "finetune_trainer_step" not in text

        # Rank 0, started by torchrun with the environment the launcher gives it.
        for name, value in gateway.trainer_env().items():
            monkeypatch.setenv(name, value)
        rank0 = Metrics(port=metrics_port(9090))
        rank0.update(Progress(step=3, totalSteps=10))
        status, text = _scrape(gateway.port)
        assert (status, _phase(text)) == (200, "running")
        assert "finetune_trainer_step 3.0" in text and "finetune_trainer_total_steps 10.0" in text

        rank0.close()
        status, text = _scrape(gateway.port)
        assert (status, _phase(text)) == (200, "exiting")
        assert "finetune_trainer_step" not in text
    finally:
        gateway.close()


def test_rank_0_under_the_launcher_listens_on_localhost_only(monkeypatch):
    monkeypatch.setenv(METRICS_ADDRESS_ENV, "127.0.0.1")
    rank0 = Metrics(port=free_local_port())
    try:
        assert rank0.server.server_address[0] == "127.0.0.1"
    finally:
        rank0.close()


def test_a_rank_0_that_does_not_answer_in_time_fails_the_scrape():
    """A failed scrape (the target down for it), not the launcher's registry posing as an initializing trainer."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        gateway = MetricsGateway(port=0, address="127.0.0.1", upstream_timeout=0.5)
        gateway.upstream_port = silent.getsockname()[1]
        try:
            status, text = _scrape(gateway.port)
        finally:
            gateway.close()
    assert status == 503 and "did not answer" in text
