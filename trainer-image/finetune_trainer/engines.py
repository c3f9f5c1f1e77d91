"""Training engines: torch DDP or DeepSpeed ZeRO, behind one small interface.

The training loop calls, per micro-batch: `accumulating(boundary)`, `backward(loss)`, and at a
boundary `step()`. The loss it hands to `backward` is already normalised for the whole optimizer
step (over its micro-batches and ranks, see train.py), so neither engine scales it by the
accumulation steps. `save(dir)` / `load(dir)` write and read model (trainable part), optimizer,
scheduler (and fp16 loss-scaler) state in the engine's own format; both are collective.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Callable

import torch

from .distributed import DistContext

STATE_FILE = "engine-state.pt"
RELEASE = "release"  # the param-group key of a group's gradual-unfreezing release (make_optimizer)


def trainable_state(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def no_decay_names(module) -> set[str]:
    """Biases and the weights of normalisation layers: like the Hugging Face Trainer, no weight decay on them."""
    names = set()
    for module_name, child in module.named_modules():
        is_norm = isinstance(child, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(child).__name__.lower()
        for name, _ in child.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm or name == "bias" or name.endswith("_bias"):
                names.add(full)
    return names


def make_optimizer(module, hyperparameters, members: set[str] | None = None, lr_scales: dict[str, float] | None = None,
                   releases: dict[str, int] | None = None):
    """AdamW over `members` (parameter names; default: those that require grad now; gradual unfreezing
    passes every parameter it will ever release), one group per (learning-rate factor, weight decay or
    not, release), in a fixed order so a checkpoint's optimizer state matches. lr_scales: per-parameter
    factors of the learning rate (layer-wise decay; 1 when absent). releases: per-parameter release of
    gradual unfreezing (0, from the start, when absent); each group carries its release under RELEASE,
    which DeepSpeed keeps through flattening and checkpoints, so a group still held back is known by it."""
    excluded = no_decay_names(module)
    groups: dict[tuple[float, bool, int], list] = {}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad if members is None else name in members:
            key = ((lr_scales or {}).get(name, 1.0), name in excluded, (releases or {}).get(name, 0))
            groups.setdefault(key, []).append(parameter)
    lr = hyperparameters.learningRate
    return torch.optim.AdamW([{"params": params, "lr": lr * factor, RELEASE: release,
                               "weight_decay": 0.0 if no_decay else hyperparameters.weightDecay}
                              for (factor, no_decay, release), params in
                              sorted(groups.items(), key=lambda g: (-g[0][0], g[0][1], g[0][2]))],
                             lr=lr)


def make_scheduler(optimizer, hyperparameters, total_steps: int):
    from transformers import get_scheduler

    warmup = int(round(hyperparameters.warmupRatio * total_steps))
    return get_scheduler(hyperparameters.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class DDPEngine:
    name = "ddp"

    def __init__(self, module, hyperparameters, total_steps: int, ctx: DistContext, precision: str,
                 optimizer_options: dict | None = None, l2sp=None):
        self.module = module.to(ctx.device)
        self.ctx = ctx
        self.max_grad_norm = hyperparameters.maxGradNorm
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else None
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.model = self._wrap()
        self.optimizer = make_optimizer(self.module, hyperparameters, **(optimizer_options or {}))
        self.scheduler = make_scheduler(self.optimizer, hyperparameters, total_steps)
        if l2sp is not None:  # every rank steps the whole module: its anchor is a full copy of the trained weights
            members = [p for group in self.optimizer.param_groups for p in group["params"]]
            l2sp.attach(self.optimizer, lambda: members, partitioned=False)

    def _wrap(self):
        if self.ctx.world_size == 1:
            return self.module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.ctx.local_rank] if self.ctx.device_type == "cuda" else None
        return DistributedDataParallel(self.module, device_ids=ids)

    def trainable_changed(self) -> None:
        """The parameters that require grad changed (gradual unfreezing): DDP registered the old set when it
        wrapped the module, so wrap it again (the old wrapper's reducer and its hooks go with it). Called at
        a step boundary, where no gradients are pending."""
        if self.model is not self.module:
            self.model = None
            gc.collect()
            self.model = self._wrap()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device_type, dtype=self.autocast_dtype)

    def accumulating(self, boundary: bool):
        if boundary or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def after_backward(self, boundary: bool) -> None:
        if boundary:
            self.step()

    def step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.max_grad_norm)
        stepped = True
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # a lowered scale means inf/nan gradients: step skipped
        else:
            self.optimizer.step()
        if stepped:  # as the Hugging Face Trainer: the schedule does not advance on a skipped step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        return max(self.scheduler.get_last_lr())  # the peak: with layer-wise decay, the head's

    def save(self, directory: Path) -> None:
        if self.ctx.is_main:
            torch.save({"model": trainable_state(self.module), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None}, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        missing = set(state["model"]) - {n for n, _ in self.module.named_parameters()}
        if missing:
            raise RuntimeError(f"checkpoint has parameters the model lacks: {sorted(missing)[:5]}")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @contextlib.contextmanager
    def full_parameters(self):
        yield


def deepspeed_config(hyperparameters, distributed, precision: str, device_type: str) -> dict:
    stage = 2 if distributed.zeroStage is None else distributed.zeroStage
    zero: dict = {"stage": stage}
    if distributed.offload in ("optimizer", "optimizer-and-params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if distributed.offload == "optimizer-and-params" and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": hyperparameters.batchSize,
        "gradient_accumulation_steps": hyperparameters.gradientAccumulationSteps,
        "gradient_clipping": hyperparameters.maxGradNorm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Our optimizer is torch's AdamW: DeepSpeed's fused/CPU Adam need compiled ops.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# Where DeepSpeed's optimizer wrappers keep the fp32 master weights they hand our torch optimizer to step,
# and whether a rank holds only its partition of them. A wrapper not listed (stage 0 in fp32) steps the
# module's own parameters on every rank.
MASTER_WEIGHTS = (
    ("fp32_partitioned_groups_flat", True),  # ZeRO-3 (one flat partition per sub-group)
    ("single_partition_of_fp32_groups", True),  # ZeRO-1 and 2 (one flat partition per group)
    ("fp32_groups_flat_partition", True),  # BF16_Optimizer (bf16 at stage 0/1)
    ("fp32_groups_flat", False),  # FP16_Optimizer (fp16 at stage 0): a full copy on every rank
)


def master_weights(ds_optimizer) -> tuple[Callable[[], list[torch.Tensor]], bool]:
    """A function returning the tensors DeepSpeed's optimizer steps now (read at every step: loading a
    checkpoint may replace them), and whether they are partitioned over the ranks."""
    for attribute, partitioned in MASTER_WEIGHTS:
        if hasattr(ds_optimizer, attribute):
            return (lambda: list(getattr(ds_optimizer, attribute))), partitioned
    members = [p for group in ds_optimizer.param_groups for p in group["params"]]
    return (lambda: members), False


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, module, hyperparameters, total_steps: int, ctx: DistContext, precision: str, distributed,
                 optimizer_options: dict | None = None, l2sp=None):
        import deepspeed

        self.ctx = ctx
        self.config = deepspeed_config(hyperparameters, distributed, precision, ctx.device_type)
        optimizer = make_optimizer(module, hyperparameters, **(optimizer_options or {}))
        scheduler = make_scheduler(optimizer, hyperparameters, total_steps)
        # Gradual unfreezing: ZeRO flattens and hooks only what requires grad at initialize, so every member
        # does then; the blocks not released yet are frozen again right after (see methods/unfreezing.py).
        self.by_release: dict[int, list[torch.nn.Parameter]] = {}
        for group in optimizer.param_groups:
            self.by_release.setdefault(group[RELEASE], []).extend(group["params"])
        held_back = [p for params in self.by_release.values() for p in params if not p.requires_grad]
        for parameter in held_back:
            parameter.requires_grad_(True)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
        for parameter in held_back:
            parameter.requires_grad_(False)
        self.module = self.model.module
        self.zero_stage = self.config["zero_optimization"]["stage"]
        self.held: set[int] = set()
        self.trainable_changed()
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        if held_back:  # before L2-SP's hook, which then sees no gradient on a held-back group either
            optimizer.register_step_pre_hook(self._hide_held_back)
            optimizer.register_step_post_hook(self._restore_held_back)
        if l2sp is not None:  # DeepSpeed steps our torch optimizer on its master weights: anchor those
            stepped, partitioned = master_weights(self.optimizer)
            l2sp.attach(optimizer, stepped, partitioned)

    def trainable_changed(self) -> None:
        """The releases whose parameters are all frozen now (gradual unfreezing), read at a step boundary."""
        self.held = {release for release, params in self.by_release.items() if not any(p.requires_grad for p in params)}

    def _hide_held_back(self, optimizer, args, kwargs) -> None:
        """ZeRO hands the torch optimizer a gradient (zeros) for every flattened group: hide it for the groups
        not released yet while the optimizer steps, so AdamW neither moves them (weight decay included) nor
        counts steps or moments for them (their first step after the release is a first step, as under DDP).
        DeepSpeed steps one group (ZeRO-1/2) or sub-group (ZeRO-3) at a time, reloads the groups from
        checkpoints and reads the gradients again after the step: the release tag, not the position, says
        which group this is, and the gradients come back after the step."""
        for group in optimizer.param_groups:
            if group.get(RELEASE, 0) in self.held:
                for tensor in group["params"]:
                    if tensor.grad is not None:
                        self._hidden.append((tensor, tensor.grad))
                        tensor.grad = None

    def _restore_held_back(self, optimizer, args, kwargs) -> None:
        for tensor, grad in self._hidden:
            tensor.grad = grad
        self._hidden.clear()

    def autocast(self):
        return contextlib.nullcontext()

    def accumulating(self, boundary: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop normalised it over the whole step

    def after_backward(self, boundary: bool) -> None:
        self.model.step()  # DeepSpeed counts micro-batches and steps the optimizer at boundaries itself

    def learning_rate(self) -> float:
        return max(self.scheduler.get_last_lr())

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    @contextlib.contextmanager
    def full_parameters(self):
        """Gather ZeRO-3 partitioned weights on every rank for the duration (saving, merging)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield


def create(module, hyperparameters, total_steps: int, ctx: DistContext, distributed, strategies=None):
    """strategies: method full's (methods.full.Strategies): optimizer members, learning-rate factors and
    releases, and L2-SP, attached to the new optimizer."""
    precision = resolve_precision(distributed.precision, ctx.device_type)
    options = strategies.optimizer_options() if strategies else None
    l2sp = strategies.l2sp if strategies else None
    if distributed.engine == "deepspeed":
        return DeepSpeedEngine(module, hyperparameters, total_steps, ctx, precision, distributed, options, l2sp)
    return DDPEngine(module, hyperparameters, total_steps, ctx, precision, options, l2sp)


def resolve_precision(precision: str, device_type: str) -> str:
    if device_type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return precision
