"""Fixtures for the trainer tests: tiny models in a session bucket, configs that run in seconds."""

from __future__ import annotations

import copy
import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "trainer-image"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("FINETUNE_TRAINER_METRICS_PORT", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from finetune_trainer.config import TrainerConfig  # noqa: E402
from finetune_trainer.storage import Storage  # noqa: E402
from finetune_trainer.testing import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: tiny.save_tiny_model(root / arch, arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def storage(s3_endpoint) -> Storage:
    return Storage(endpoint=s3_endpoint)


@pytest.fixture(scope="session")
def model_bucket(storage, tiny_model_dirs) -> str:
    """s3://<bucket>/ holding llama/ and qwen2/ tiny models."""
    name = f"models-{uuid.uuid4().hex[:8]}"
    storage.client.create_bucket(Bucket=name)
    for arch, directory in tiny_model_dirs.items():
        storage.upload_dir(directory, f"s3://{name}/{arch}/")
    return f"s3://{name}/"


@pytest.fixture
def bucket(s3_bucket) -> str:
    return f"s3://{s3_bucket[1]}/"


MERGED = {"preprocessing", "hyperparameters", "checkpoint", "evaluation", "runtime", "storage", "output"}


def make_config(bucket: str, model_uri: str, endpoint: str, datasets: list[dict], **overrides) -> TrainerConfig:
    """A TrainerConfig small enough to train in seconds on CPU. Overrides of the MERGED sections
    update them key by key; other overrides replace the section."""
    document = {
        "job": {"namespace": "team-a", "name": "tiny", "runId": "1"},
        "model": {"uri": model_uri},
        "datasets": datasets,
        "preprocessing": {"maxSeqLength": 64, "deduplicate": False},
        "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
        "objective": "sft",
        "hyperparameters": {"epochs": 1, "maxSteps": 12, "learningRate": 5e-3, "batchSize": 4, "warmupRatio": 0.0,
                            "scheduler": "constant"},
        "checkpoint": {"everySteps": 1000, "keep": 2},
        "output": {"uri": bucket + "out/"},
        "evaluation": {"compareToBase": True},
        "storage": {"endpoint": endpoint},
        "runtime": {"metricsPort": 0, "progressIntervalSeconds": 0.2},
    }
    for key, value in overrides.items():
        if key in MERGED:
            document[key] = {**document[key], **value}
        else:
            document[key] = value
    return TrainerConfig.model_validate(document)


def upload_dataset(storage: Storage, bucket: str, name: str, fmt: str, n: int, seed: int = 0) -> dict:
    uri = tiny.upload_rows(storage, f"{bucket}data/{name}.jsonl", tiny.sample_rows(fmt, n, seed))
    return {"uri": uri, "format": fmt}


@pytest.fixture(scope="session")
def tokenizers():
    """The tiny tokenizers with and without a chat template: ChatML (no BOS) and Llama-style (BOS)."""
    chatml, llama = tiny.train_tokenizer(), tiny.train_bos_tokenizer()
    chatml_plain, llama_plain = copy.deepcopy(chatml), copy.deepcopy(llama)
    chatml_plain.chat_template = llama_plain.chat_template = None
    return {"chatml": chatml, "chatml-plain": chatml_plain, "llama": llama, "llama-plain": llama_plain}
