# The Helm chart (charts/finetune-operator) and the Argo CD health check (argocd/).
HELM_CHART := charts/finetune-operator
.PHONY: helm chart-crds chart-lint chart-template chart-test argocd-testdata test-helm

helm: venv ## build (or find cached) helm from its Go module into the cache
	$(PY) -m e2e.localcluster.build helm

chart-crds: ## copy the generated CRDs (crds/) into the chart
	cp crds/*.yaml $(HELM_CHART)/crds/

chart-lint: helm ## helm lint --strict with default and all-features values
	$$($(PY) -c 'from e2e.localcluster.build import HELM; print(HELM.binary("helm"))') lint --strict $(HELM_CHART)
	$$($(PY) -c 'from e2e.localcluster.build import HELM; print(HELM.binary("helm"))') lint --strict $(HELM_CHART) \
	  --values $(HELM_CHART)/ci/all-features-values.yaml

chart-template: helm ## render the chart with default values to stdout
	@$$($(PY) -c 'from e2e.localcluster.build import HELM; print(HELM.binary("helm"))') template finetune-operator \
	  $(HELM_CHART) --namespace finetune-system

chart-test: venv ## chart and Argo CD health tests that need no cluster (lint, render, schema, RBAC, Lua)
	$(PY) -m pytest tests/chart

argocd-testdata: venv ## regenerate argocd/'s health test data and argocd-cm patch from the operator's status code
	$(PY) -m tests.chart.argocd_cases

test-helm: venv ## helm install/uninstall on the local cluster (starts it if needed)
	$(PY) -m pytest e2e/tests/test_helm.py -m cluster
