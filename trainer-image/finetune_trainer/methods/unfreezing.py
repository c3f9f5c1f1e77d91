"""Gradual unfreezing (ULMFiT, Howard and Ruder 2018): the top blocks train first, lower ones join later.

The schedule is a pure function of the run's optimizer step (steps done so far, over all stages), so a
run resumed from a checkpoint has, at every step, the trainable set an uninterrupted run has: nothing
about it is checkpointed. `everyEpochs` counts the epoch starts of every stage up to that step.

Optimizer: every parameter the schedule will ever release is in the optimizer from the start, with
requires_grad toggled, in param groups that never mix parameters of different releases (`release_of`;
each group is tagged with its release). AdamW skips a parameter whose grad is None (no update, no weight
decay, no moments, no step count), so a frozen block stays at its base weights until released, starts
its moments fresh then, and the optimizer's param groups, hence its checkpointed state, are the same at
every step. The engines:
- DDP registers the parameters that require grad when it wraps the module, so at each release the
  engine wraps the module again (engines.DDPEngine.trainable_changed): between releases the set is
  static and no find_unused_parameters graph walk is paid at every step.
- DeepSpeed ZeRO flattens (and from stage 1 partitions) each param group once, at initialize, and
  only what requires grad then: the engine makes every member trainable for initialize, freezes the
  held-back ones again (their blocks get no gradient, as unused parameters; backward stops at the
  lowest released block), and drops the flattened gradient of every group whose release has not come
  just before its torch optimizer steps, so AdamW skips those groups as it skips frozen parameters
  under DDP (engines.DeepSpeedEngine). A held-back group costs its fp32 master weights and, once
  released, its moments, partitioned like every other group: no full copy on any rank.
"""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDINGS = -1  # depth of the (untied) input embeddings; blocks are 0..L-1, the head side L


@dataclass(frozen=True)
class UnfreezeSchedule:
    blocks: int                  # L, the model's transformer blocks
    start: int                   # top blocks trainable at step 0
    per_release: int
    floor: int                   # lowest blocks never released
    every_steps: int | None = None
    every_epochs: int | None = None
    epoch_starts: tuple[int, ...] = ()  # global steps at which an epoch starts (every stage's, 0 included)

    def releases(self, step: int) -> int:
        """Releases done before optimizer step step+1 (step = steps already done in the run)."""
        if self.every_steps:
            return step // self.every_steps
        started = sum(1 for s in self.epoch_starts if 0 < s <= step)
        return started // self.every_epochs

    def top_blocks(self, step: int) -> int:
        return self.top_after(self.releases(step))

    def top_after(self, releases: int) -> int:
        """Top blocks trainable after `releases` releases."""
        return min(self.start + self.per_release * releases, self.final_top_blocks())

    def final_top_blocks(self) -> int:
        return self.blocks - self.floor

    def release_of(self, depth: int) -> int:
        """The release after which a parameter at depth trains (0: from the first step); depth must be one the
        schedule releases at some point."""
        for release in range(self.blocks + 1):
            if trainable(depth, self.top_after(release), self.blocks):
                return release
        raise ValueError(f"depth {depth} is never released (floor {self.floor} of {self.blocks} blocks)")


def trainable(depth: int, top: int, blocks: int) -> bool:
    """Whether a parameter at depth (EMBEDDINGS, a block index, or blocks for the head side) trains when
    the top `top` blocks do: the input embeddings join with the lowest block."""
    if depth == EMBEDDINGS:
        return top >= blocks
    return depth >= blocks - top


def set_trainable(model, depths: dict[str, int], top: int, blocks: int) -> bool:
    """requires_grad of every parameter for `top` trainable blocks; True when anything changed."""
    changed = False
    for name, parameter in model.named_parameters():
        wanted = trainable(depths[name], top, blocks)
        if parameter.requires_grad != wanted:
            parameter.requires_grad_(wanted)
            changed = True
    return changed


def epoch_starts(plans: list[tuple[int, int, int]]) -> tuple[int, ...]:
    """The global steps at which an epoch starts, from (first global step, total steps, steps per epoch) per stage."""
    out = []
    for first, total, per_epoch in plans:
        out += [first + k for k in range(0, total, max(per_epoch, 1))]
    return tuple(out)
