# The local control plane (e2e/localcluster): built from Go modules, cached by version.
.PHONY: cluster-build cluster-up cluster-down cluster-status test-cluster

# Only the standard library: runs in parallel with `make venv` (make -j2 venv cluster-build).
cluster-build: ## build (or find cached) etcd, Kubernetes, training-operator and KWOK binaries
	python3 -m e2e.localcluster.build

cluster-up: venv ## build what is missing, start the local cluster, wait until ready
	$(PY) -m e2e.localcluster up

cluster-down: ## stop every process of the local cluster
	@if [ -x $(PY) ]; then $(PY) -m e2e.localcluster down; fi

cluster-status: venv ## show the local cluster's components, ports and logs
	$(PY) -m e2e.localcluster status

test-cluster: venv ## run the control-plane tests (tier 2; starts the cluster if needed)
	$(PY) -m pytest e2e/tests -m cluster

.PHONY: operator-up operator-down pod-logs
operator-up: venv ## run the operator from the working tree against the local cluster, in the background
	$(PY) -m e2e.localcluster operator-up

operator-down: ## stop the operator started by operator-up
	@if [ -x $(PY) ]; then $(PY) -m e2e.localcluster operator-down; fi

pod-logs: ## output of a pod run by the local node runtime: make pod-logs NS=<namespace> POD=<pod>
	$(PY) -m e2e.localcluster logs $(NS) $(POD)

.PHONY: demo
demo: venv ## set everything up and run the demo FineTuneJob end to end (real training on 2 local workers)
	$(PY) -m e2e.demo
