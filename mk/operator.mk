# The operator (operator/finetune_operator): CRD generation, unit tests, running it locally.
.PHONY: crds test-operator golden operator-run operator-install-crds

OPERATOR_CONFIG ?= operator/config/dev.yaml

crds: venv ## regenerate crds/ and the field reference in docs/api.md from the typed models
	$(PY) -m finetune_operator.api.crd crds
	$(PY) -m finetune_operator.api.docs docs/api.md

test-operator: venv ## run the operator's unit tests (models, CRD, builders, status, reconcile decisions)
	$(PY) -m pytest tests/operator -q

golden: venv ## rewrite the builders' golden YAML (tests/operator/golden); review the diff
	UPDATE_GOLDEN=1 $(PY) -m pytest tests/operator/test_op_builders.py -q

operator-install-crds: ## apply the CRDs to the cluster in $KUBECONFIG (server-side)
	kubectl apply --server-side --force-conflicts -f crds/
	kubectl wait --for=condition=Established crd/finetunejobs.finetune.dev crd/tenantpolicies.finetune.dev --timeout=60s

operator-run: venv operator-install-crds ## run the operator against $KUBECONFIG with $(OPERATOR_CONFIG) (S3: $$FINETUNE_S3_ENDPOINT)
	$(PY) -m finetune_operator --config $(OPERATOR_CONFIG)
