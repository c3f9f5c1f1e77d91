"""full: every weight is trained, except the lowest freezeLayers blocks and the embeddings below them.

A model whose input embeddings and output head share one matrix (tie_word_embeddings: Llama-3.2,
Qwen2.5 small, Gemma, SmolLM) keeps that matrix trainable: freezing it would silently freeze the
output head too. The run says so in a `tied-embeddings` event. Gradual unfreezing treats the tied
matrix the same way, and layer-wise learning rates give it the head's rate.

method.full adds the strategies (one module each): unfreezing (gradual unfreezing), l2sp (stay close to
the base weights), layerwise_lr (layer-wise learning-rate decay); `Strategies` wires them into the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import events
from ..errors import ConfigError
from . import MethodSpec, layerwise_lr, register, unfreezing
from .l2sp import L2SP


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks, found by shape rather than by architecture name."""
    layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise ConfigError(f"cannot find the {layers} transformer blocks of {type(model).__name__} to freeze")


def embeddings_tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def parameter_depths(model) -> dict[str, int]:
    """Each parameter's depth: its block's index, unfreezing.EMBEDDINGS for the input embeddings, or the
    number of blocks for the head side (final norm, output head, and embeddings tied to the head)."""
    blocks = transformer_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks) + "."
    embedding_ids = set() if embeddings_tied(model) else {id(p) for p in model.get_input_embeddings().parameters()}
    depths = {}
    for name, parameter in model.named_parameters():
        if name.startswith(prefix):
            depths[name] = int(name[len(prefix):].split(".", 1)[0])
        else:
            depths[name] = unfreezing.EMBEDDINGS if id(parameter) in embedding_ids else len(blocks)
    return depths


def frozen_top(model, method) -> int:
    """Top blocks trainable at the start: all but freezeLayers, or unfreeze.startTopBlocks."""
    blocks = len(transformer_blocks(model))
    settings = method.full.unfreeze if method.full else None
    if settings is not None:
        if settings.startTopBlocks + settings.floor > blocks:
            raise ConfigError(f"method.full.unfreeze: startTopBlocks {settings.startTopBlocks} + floor {settings.floor} "
                              f"exceeds the model's {blocks} blocks")
        return settings.startTopBlocks
    freeze = method.freezeLayers or 0
    if freeze > blocks:
        raise ConfigError(f"method.freezeLayers={freeze} but the model has only {blocks} blocks")
    return blocks - freeze


def apply(model, method, device_type: str):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    unfreeze = method.full is not None and method.full.unfreeze is not None
    if not (method.freezeLayers or unfreeze):
        return model
    blocks = len(transformer_blocks(model))
    top = frozen_top(model, method)
    if embeddings_tied(model) and top < blocks:
        events.emit("tied-embeddings", message="the input embeddings are the output head's weights: kept trainable")
    unfreezing.set_trainable(model, parameter_depths(model), top, blocks)
    return model


@dataclass
class Strategies:
    """method.full's strategies for one run: the optimizer's members and learning-rate factors, L2-SP (which
    each engine attaches to its optimizer) and the step hook (gradual unfreezing)."""

    depths: dict[str, int]
    blocks: int
    schedule: unfreezing.UnfreezeSchedule | None = None
    l2sp: L2SP | None = None
    lr_scales: dict[str, float] | None = None
    top: int | None = None  # trainable top blocks now; None until the first step (which emits `unfreeze`)
    # gradual unfreezing: every parameter the schedule will ever release (the optimizer's members), with its
    # release (its optimizer group's tag); None without a schedule (the members are what requires grad)
    releases: dict[str, int] | None = None

    def optimizer_options(self) -> dict:
        members = set(self.releases) if self.releases is not None else None
        return {"members": members, "lr_scales": self.lr_scales, "releases": self.releases}

    def before_step(self, module, global_step: int) -> bool:
        """Set the trainable blocks for the step after global_step steps; True when they changed."""
        if self.schedule is None:
            return False
        top = self.schedule.top_blocks(global_step)
        changed = unfreezing.set_trainable(module, self.depths, top, self.blocks)
        if top != self.top:
            events.emit("unfreeze", step=global_step, trainableTopBlocks=top, blocks=self.blocks)
            self.top = top
        return changed

    def step_fields(self, device: torch.device) -> dict:
        """The step event's fields; collective (every rank calls it: L2-SP sums ZeRO's partitions)."""
        out = {}
        if self.schedule is not None:
            out["trainableTopBlocks"] = self.top
        if self.l2sp is not None:
            out["l2spPenalty"] = self.l2sp.value(device)
        return out


def strategies(model, method, epoch_starts: tuple[int, ...] = ()) -> Strategies | None:
    """The run's Strategies for method full with method.full set (None otherwise); call after apply. L2-SP
    anchors the weights the first engine's optimizer steps when that engine is created (engines.create)."""
    settings = method.full if method.type == "full" else None
    if settings is None:
        return None
    depths, blocks = parameter_depths(model), len(transformer_blocks(model))
    out = Strategies(depths, blocks)
    if settings.unfreeze is not None:
        u = settings.unfreeze
        out.schedule = unfreezing.UnfreezeSchedule(blocks, u.startTopBlocks, u.blocksPerRelease, u.floor,
                                                   u.everySteps, u.everyEpochs, epoch_starts)
        final = out.schedule.final_top_blocks()
        out.releases = {n: out.schedule.release_of(d) for n, d in depths.items()
                        if unfreezing.trainable(d, final, blocks)}
    if settings.layerwiseLRDecay is not None:
        out.lr_scales = layerwise_lr.lr_scales(depths, blocks, settings.layerwiseLRDecay)
    if settings.l2sp is not None:
        device = "cpu" if settings.l2sp.anchorDevice == "cpu" else None
        out.l2sp = L2SP(settings.l2sp.strength, device)
    return out


SPEC = register(MethodSpec("full", apply, uses_adapter=False))
