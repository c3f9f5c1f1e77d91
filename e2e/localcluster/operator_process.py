"""Run the operator from the working tree against the local cluster, in the background.

`make operator-up` / `make operator-down`. Its OperatorConfig is operator/config/dev.yaml with the
local cluster's facts filled in (the S3 endpoint, the trainer image, free ports for metrics and
liveness); its log is .cluster/logs/operator.log and Prometheus scrapes its metrics. The demo and
the end-to-end tier run the operator from its chart instead (operator_release.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from .cluster import LocalCluster
from .operator_release import install_crds, local_operator_config
from .paths import REPO_ROOT
from .procs import free_port, http_ok, pid_alive, start_logged, terminate_group, wait_until


class OperatorProcess:
    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        self.pid_file = cluster.root / "operator.json"
        self.log_file = cluster.logs / "operator.log"
        self.config_file = cluster.root / "operator-config.yaml"

    def _state(self) -> dict:
        return json.loads(self.pid_file.read_text()) if self.pid_file.exists() else {}

    def running(self) -> bool:
        pid = self._state().get("pid")
        return bool(pid) and pid_alive(pid)

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._state()['metricsPort']}/metrics"

    def install_crds(self) -> None:
        install_crds(self.cluster)

    def render_config(self, metrics_port: int, liveness_port: int, overrides: dict | None = None) -> Path:
        config = local_operator_config(self.cluster, overrides)
        config.update(operatorMetricsPort=metrics_port, livenessPort=liveness_port)
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_file

    def up(self, log=print, overrides: dict | None = None) -> None:
        """Start it (OperatorConfig fields in `overrides` replace dev.yaml's)."""
        if self.running():
            log(f"operator already running (pid {self._state()['pid']}), log {self.log_file}")
            return
        self.install_crds()
        metrics_port, liveness_port = free_port(), free_port()
        config = self.render_config(metrics_port, liveness_port, overrides)
        env = dict(os.environ, KUBECONFIG=str(self.cluster.kubeconfig), PYTHONUNBUFFERED="1")
        proc = start_logged([sys.executable, "-m", "finetune_operator", f"--config={config}"], self.log_file,
                            env=env, cwd=REPO_ROOT)
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "metricsPort": metrics_port,
                                             "livenessPort": liveness_port}))
        wait_until(lambda: http_ok(f"http://127.0.0.1:{liveness_port}/healthz"), 90, "operator liveness",
                   proc=proc, log_file=self.log_file)
        target = self.cluster.prometheus_targets_dir / "operator.json"
        target.write_text(json.dumps([{"targets": [f"127.0.0.1:{metrics_port}"],
                                       "labels": {"source": "finetune-operator"}}]))
        log(f"operator running (pid {proc.pid}); log {self.log_file}; metrics {self.metrics_url()}")

    def down(self, log=print) -> None:
        pid = self._state().get("pid")
        if pid and pid_alive(pid):
            terminate_group(pid, grace=15)
            log(f"stopped the operator (pid {pid})")
        self.pid_file.unlink(missing_ok=True)
        (self.cluster.prometheus_targets_dir / "operator.json").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no cleanup, no graceful shutdown."""
        pid = self._state().get("pid")
        if pid and pid_alive(pid):
            os.killpg(pid, 9)
            wait_until(lambda: not pid_alive(pid), 10, "the killed operator to exit")
        self.pid_file.unlink(missing_ok=True)
