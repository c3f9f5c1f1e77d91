"""Two processes on CPU, checked against what the rule, one process or DDP gives: layer-wise learning rates under
DeepSpeed ZeRO-2, the quantities the ranks sum (KTO's reference point, interleaved per-dataset losses), and L2-SP
and gradual unfreezing under ZeRO-2 and ZeRO-3 against DDP.

Launched like test_distributed.py (its torchrun helper: gloo, DeepSpeed's CPU accelerator)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import make_config, upload_dataset
from test_distributed import torchrun

from finetune_trainer import config as cfg
from finetune_trainer.testing import tiny


def step_events(stdout: str) -> list[dict]:
    return [json.loads(l) for l in stdout.splitlines() if l.startswith('{"event": "step"')]


# ---- layer-wise learning-rate decay under DeepSpeed ZeRO-2 -------------------------------------------------

BLOCKS, DECAY, LR = 4, 0.5, 1e-3


def expected_scale(name: str) -> float:
    """The documented rule (config.FullSettings.layerwiseLRDecay), written out independently of layerwise_lr:
    block i of L at d^(L-1-i), the (untied) input embeddings at d^L, final norm and output head at 1."""
    if name.startswith("model.layers."):
        return DECAY ** (BLOCKS - 1 - int(name.split(".")[2]))
    if name == "model.embed_tokens.weight":
        return DECAY ** BLOCKS
    assert name in ("model.norm.weight", "lm_head.weight"), name
    return 1.0


@pytest.mark.slow
def test_zero2_steps_every_layer_at_its_decayed_learning_rate(storage, bucket, s3_endpoint, tmp_path):
    """One optimizer step of method full with layerwiseLRDecay under 2-process ZeRO-2. The optimizer is torch's
    AdamW, whose first step moves every element by lr_group * g / (|g| + eps): with weight decay 0, the largest
    move of each weight is its parameter group's learning rate. So the weights written out show which rate
    DeepSpeed's partitioned optimizer applied to each layer: the head's, then a factor DECAY less per block down,
    and DECAY^BLOCKS for the embeddings; and nearly every element of a dense weight moves by about that much,
    whichever rank's partition of the flattened group holds it. (The rule itself, on the optimizer's param
    groups without DeepSpeed: test_full_strategies.py.)"""
    base_dir = tiny.save_tiny_model(tmp_path / "base", "llama", layers=BLOCKS)
    model_uri = f"{bucket}models/llama-{BLOCKS}-blocks/"
    storage.upload_dir(base_dir, model_uri)
    ds = upload_dataset(storage, bucket, "chat", "chat", 16)
    config = make_config(bucket, model_uri, s3_endpoint, [ds],
                         method={"type": "full", "full": {"layerwiseLRDecay": DECAY}},
                         distributed={"engine": "deepspeed", "zeroStage": 2},
                         hyperparameters={"maxSteps": 1, "batchSize": 4, "learningRate": LR, "weightDecay": 0.0},
                         evaluation={"compareToBase": False}, output={"uri": bucket + "layerwise-zero2/"})
    done = torchrun(config, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (step,) = step_events(done.stdout)
    assert step["learningRate"] == pytest.approx(LR)  # the reported rate is the head's

    before = safetensors.torch.load_file(base_dir / "model.safetensors")
    after = safetensors.torch.load(storage.get_bytes(cfg.merged_uri(config.output.uri) + "model.safetensors"))
    assert after.keys() == before.keys()
    applied, moved = {}, {}
    for name, weight in before.items():
        delta = (after[name].float() - weight.float()).abs()
        rate = LR * expected_scale(name)
        applied[name] = delta.max().item()
        assert applied[name] == pytest.approx(rate, rel=1e-3), name  # 1e-3: rounding where a weight is ~1 (norms)
        moved[name] = (delta > 0.5 * rate).float().mean().item()
    # every kind of layer is there: 4 blocks, the embeddings, the final norm and the head
    assert {expected_scale(n) for n in before} == {1.0, DECAY, DECAY ** 2, DECAY ** 3, DECAY ** 4}
    # the ratio between consecutive blocks is the decay (same-shaped weights of blocks i and i+1)
    for block in range(BLOCKS - 1):
        for kind in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
            lower, upper = (applied[f"model.layers.{i}.{kind}"] for i in (block, block + 1))
            assert lower / upper == pytest.approx(DECAY, rel=1e-3)
    assert applied["model.embed_tokens.weight"] / applied["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(
        DECAY, rel=1e-3)
    # dense weights: almost every element has a gradient well above Adam's eps (the embeddings: only the rows of
    # the tokens in the batch), so a rank whose partition stepped at another rate would show here
    assert min(v for n, v in moved.items() if n != "model.embed_tokens.weight") > 0.95, moved


# ---- KTO's reference point and interleaved per-dataset losses: 2 processes as 1 -------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("engine", [{"engine": "ddp"}, {"engine": "deepspeed", "zeroStage": 3}], ids=["ddp", "zero3"])
def test_two_processes_report_the_kto_reference_point_and_dataset_losses_of_one(engine, storage, model_bucket, bucket,
                                                                                 s3_endpoint, tmp_path, capfd):
    """Interleaved KTO over two feedback datasets: 2 processes with batchSize 2 train on the same rows at each
    micro-batch as 1 process with batchSize 4 (the rows of a global micro-batch are split between the ranks).
    KTO's reference point z is the mean over every rank's mismatched pairs, and a step's per-dataset losses
    are means over every rank's rows of that dataset: each step's loss, `kl` (z) and per-dataset losses
    must be those of the single process (run in this process, engine ddp with one rank). At the first step the
    policy is the reference (r = z = 0, every loss 0.5); from the second on z and the losses depend on which
    rows each rank averages, so a rank that used only its own rows would report other values. Under ZeRO-3 too,
    where every forward (the mismatched pairs' without gradient, then the rows') gathers the partitioned weights."""
    from finetune_trainer.run import execute

    datasets = [upload_dataset(storage, bucket, "fb-a", "feedback", 20, seed=0),
                upload_dataset(storage, bucket, "fb-b", "feedback", 12, seed=1)]

    def kto_config(output: str, batch_size: int, distributed: dict | None = None):
        return make_config(bucket, model_bucket + "llama/", s3_endpoint, datasets, objective="kto",
                           **({"distributed": distributed} if distributed else {}),
                           preprocessing={"multiTask": {"strategy": "interleave"}},
                           hyperparameters={"maxSteps": 4, "batchSize": batch_size, "gradientAccumulationSteps": 2,
                                            "learningRate": 2e-2, "ktoBeta": 0.5},
                           evaluation={"compareToBase": False}, output={"uri": bucket + output})

    one = execute(kto_config("kto-one/", 4), tmp_path / "one")
    one_out = capfd.readouterr().out
    assert one.exit_code == 0, one.result.message
    done = torchrun(kto_config("kto-two/", 2, engine), tmp_path, timeout=480)  # DeepSpeed may JIT-build its CPU op
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    single, double = step_events(one_out), step_events(done.stdout)
    assert len(single) == len(double) == 4
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (a, b)
        assert b["metrics"]["kl"] == pytest.approx(a["metrics"]["kl"], rel=1e-4, abs=1e-6), (a, b)
        assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-4, abs=1e-6), (a, b)  # rewards, label share
        assert [d["index"] for d in b["datasetLosses"]] == [d["index"] for d in a["datasetLosses"]]
        for x, y in zip(a["datasetLosses"], b["datasetLosses"]):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6), (a, b)
    # the comparison means something: the policy moved (z > 0 at some step) and some step has both datasets
    assert any(s["metrics"]["kl"] > 1e-3 for s in single[1:]), single
    assert any(len(s["datasetLosses"]) == 2 for s in single[1:]), single


# ---- L2-SP under DeepSpeed ZeRO: each rank anchors only its partition ----------------------------------------

L2SP_CASES = [("ddp", {"engine": "ddp"}), ("zero2", {"engine": "deepspeed", "zeroStage": 2}),
              ("zero3", {"engine": "deepspeed", "zeroStage": 3}),
              ("zero3-offload", {"engine": "deepspeed", "zeroStage": 3, "offload": "optimizer"})]


def full_run(storage, model_uri: str, bucket, s3_endpoint, tmp_path, name: str, distributed: dict, full: dict,
             steps: int = 6, output: str | None = None, weight_decay: float = 0.0) -> tuple[list[dict], dict | None]:
    """`steps` steps of method full with `full` (method.full) on 2 processes (a checkpoint every 3); the step events
    and the l2sp-anchor event (rank 0's)."""
    ds = upload_dataset(storage, bucket, "chat", "chat", 24)
    config = make_config(bucket, model_uri, s3_endpoint, [ds], method={"type": "full", "full": full},
                         distributed=distributed, evaluation={"compareToBase": False},
                         hyperparameters={"maxSteps": steps, "batchSize": 2, "learningRate": 1e-2,
                                          "weightDecay": weight_decay},
                         checkpoint={"everySteps": 3, "keep": 2}, output={"uri": f"{bucket}{output or name}/"})
    (tmp_path / name).mkdir()
    done = torchrun(config, tmp_path / name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    events = [json.loads(l) for l in done.stdout.splitlines() if l.startswith('{"event": "l2sp-anchor"')]
    return step_events(done.stdout), (events[0] if events else None)


def l2sp_run(storage, model_bucket, bucket, s3_endpoint, tmp_path, name: str, distributed: dict,
             strength: float | None, steps: int = 6, output: str | None = None) -> tuple[list[dict], dict | None]:
    full = {"l2sp": {"strength": strength}} if strength else {"layerwiseLRDecay": 1.0}
    return full_run(storage, model_bucket + "llama/", bucket, s3_endpoint, tmp_path, name, distributed, full, steps,
                    output)


@pytest.mark.slow
def test_zero_trains_with_l2sp_as_ddp_does_and_anchors_a_partition_per_rank(storage, model_bucket, bucket,
                                                                             s3_endpoint, tmp_path):
    """The same six steps with L2-SP under DDP, ZeRO-2, ZeRO-3 and ZeRO-3 with the optimizer offloaded (its master
    weights, and so the anchor, in host memory) on 2 processes: the same losses and penalties
    (the penalty moves the weights: without it the losses differ), while under ZeRO a rank anchors half of the
    trained weights, not a full copy (DDP's gradient is checked against autograd in test_full_strategies.py)."""
    without, _ = l2sp_run(storage, model_bucket, bucket, s3_endpoint, tmp_path, "plain", {"engine": "ddp"}, None)
    runs = {name: l2sp_run(storage, model_bucket, bucket, s3_endpoint, tmp_path, name, distributed, 1.0)
            for name, distributed in L2SP_CASES}
    reference, anchor = runs["ddp"]
    assert anchor["partitioned"] is False
    trained = anchor["anchoredElements"]  # every weight: method full freezes nothing here
    assert abs(reference[-1]["loss"] - without[-1]["loss"]) > 1e-3
    # the penalty at the weights each step's gradient is taken at: 0 at the base, then not
    assert reference[0]["l2spPenalty"] == 0 and all(s["l2spPenalty"] > 0 for s in reference[1:])
    for name in ("zero2", "zero3", "zero3-offload"):
        steps, anchor = runs[name]
        assert anchor["partitioned"] is True
        assert abs(anchor["anchoredElements"] - trained / 2) <= 0.01 * trained, (name, anchor, trained)
        assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in reference], rel=1e-4), name
        assert [s["l2spPenalty"] for s in steps] == pytest.approx([s["l2spPenalty"] for s in reference], rel=1e-3), name

    # A ZeRO-3 run lost after step 4 resumes from its step-3 checkpoint: the new engine anchors the base weights
    # before the checkpoint is loaded, so steps 4-6 are those of the run that never stopped (anchored at the
    # restored weights, the penalty would start again from 0).
    first, _ = l2sp_run(storage, model_bucket, bucket, s3_endpoint, tmp_path, "zero3-part1", dict(L2SP_CASES)["zero3"],
                        1.0, steps=4, output="zero3-resumed")
    storage.delete_prefix(cfg.result_uri(f"{bucket}zero3-resumed/", "1"))  # as if it was killed before finishing
    resumed, _ = l2sp_run(storage, model_bucket, bucket, s3_endpoint, tmp_path, "zero3-part2", dict(L2SP_CASES)["zero3"],
                          1.0, steps=6, output="zero3-resumed")
    uninterrupted = runs["zero3"][0]
    assert [s["step"] for s in first] == [1, 2, 3, 4] and [s["step"] for s in resumed] == [4, 5, 6]
    for key in ("loss", "l2spPenalty"):
        assert [s[key] for s in resumed] == pytest.approx([s[key] for s in uninterrupted[3:]], rel=1e-4), key


# ---- gradual unfreezing under DeepSpeed ZeRO: the blocks held back stay out of the optimizer ------------------

UNFREEZE_CASES = [("ddp", {"engine": "ddp"}), ("zero2", {"engine": "deepspeed", "zeroStage": 2}),
                  ("zero3", {"engine": "deepspeed", "zeroStage": 3}),
                  ("zero3-offload", {"engine": "deepspeed", "zeroStage": 3, "offload": "optimizer"})]


def unfreeze_run(storage, base_uri: str, bucket, s3_endpoint, tmp_path, name: str, distributed: dict, steps: int = 6,
                 output: str | None = None) -> list[dict]:
    """Gradual unfreezing on the 4-block model: the top block trains first and one more joins every 2 steps, with
    layer-wise rates, L2-SP and weight decay; the step events."""
    full = {"unfreeze": {"startTopBlocks": 1, "everySteps": 2}, "layerwiseLRDecay": 0.8, "l2sp": {"strength": 0.5}}
    return full_run(storage, base_uri, bucket, s3_endpoint, tmp_path, name, distributed, full, steps, output,
                    weight_decay=0.1)[0]


@pytest.mark.slow
def test_zero_unfreezes_gradually_as_ddp_does(storage, bucket, s3_endpoint, tmp_path):
    """Six steps of gradual unfreezing (top 1 block, then 2, then 3 of 4) under DDP, ZeRO-2, ZeRO-3 and ZeRO-3 with
    the optimizer offloaded: the same trainable blocks, losses and L2-SP penalties at every step (that DDP's frozen
    blocks stay put until released is checked in test_full_strategies.py), and under
    ZeRO the lowest block and the embeddings, never released, are the base weights bit for bit at the end, though
    ZeRO flattened them with the rest and weight decay is on, while the released blocks moved. A ZeRO-2 and a ZeRO-3
    run lost after step 4 resume from their step-3 checkpoint, taken while two releases were still held back, and
    release the third block at step 5 exactly as the runs that never stopped."""
    base_dir = tiny.save_tiny_model(tmp_path / "base", "llama", layers=BLOCKS)
    base_uri = f"{bucket}models/llama-{BLOCKS}-blocks/"
    storage.upload_dir(base_dir, base_uri)
    runs = {name: unfreeze_run(storage, base_uri, bucket, s3_endpoint, tmp_path, name, distributed)
            for name, distributed in UNFREEZE_CASES}
    reference = runs["ddp"]
    assert [s["trainableTopBlocks"] for s in reference] == [1, 1, 2, 2, 3, 3]
    for name, steps in runs.items():
        assert [s["trainableTopBlocks"] for s in steps] == [1, 1, 2, 2, 3, 3], name
        assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in reference], rel=1e-4), name
        assert [s["l2spPenalty"] for s in steps] == pytest.approx([s["l2spPenalty"] for s in reference], rel=1e-3), name

    before = safetensors.torch.load_file(base_dir / "model.safetensors")
    for name, _ in UNFREEZE_CASES:
        after = safetensors.torch.load(storage.get_bytes(cfg.merged_uri(f"{bucket}{name}/") + "model.safetensors"))
        for weight, value in before.items():
            never_released = weight == "model.embed_tokens.weight" or weight.startswith("model.layers.0.")
            if never_released:
                assert torch.equal(after[weight], value), (name, weight)
            elif weight.endswith("proj.weight"):
                assert not torch.equal(after[weight], value), (name, weight)

    for name in ("zero2", "zero3"):
        first = unfreeze_run(storage, base_uri, bucket, s3_endpoint, tmp_path, f"{name}-part1", dict(UNFREEZE_CASES)[name],
                             steps=4, output=f"{name}-resumed")
        storage.delete_prefix(cfg.result_uri(f"{bucket}{name}-resumed/", "1"))  # as if it was killed before finishing
        resumed = unfreeze_run(storage, base_uri, bucket, s3_endpoint, tmp_path, f"{name}-part2",
                               dict(UNFREEZE_CASES)[name], output=f"{name}-resumed")
        assert [s["step"] for s in first] == [1, 2, 3, 4] and [s["step"] for s in resumed] == [4, 5, 6], name
        assert [s["trainableTopBlocks"] for s in resumed] == [2, 3, 3], name
        for key in ("loss", "l2spPenalty"):
            assert [s[key] for s in resumed] == pytest.approx([s[key] for s in runs[name][3:]], rel=1e-4), (name, key)
