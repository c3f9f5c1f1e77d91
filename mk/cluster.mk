# The local control plane (e2e/localcluster): built from Go modules, cached by version.
.PHONY: cluster-build cluster-up cluster-down cluster-status test-cluster

# Only the standard library: runs in parallel with `make venv` (make -j2 venv cluster-build).
cluster-build: ## install the node's Debian packages; build (or find cached) every binary and image
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

pod-logs: ## output of a pod on the real node: make pod-logs NS=<namespace> POD=<pod>
	$(PY) -m e2e.localcluster logs $(NS) $(POD)

.PHONY: operator-install operator-uninstall
operator-install: venv ## install (or upgrade) the operator in the local cluster with its Helm chart and image
	$(PY) -m e2e.localcluster operator-install

operator-uninstall: ## helm uninstall the operator from the local cluster
	@if [ -x $(PY) ]; then $(PY) -m e2e.localcluster operator-uninstall; fi

.PHONY: demo
# The Python environment beside the Go builds and images, as CI does; each finds its cache when warm.
demo: ## set everything up and run the demo FineTuneJob end to end (real training in 2 containers)
	$(MAKE) -j2 venv cluster-build
	$(PY) -m e2e.demo
