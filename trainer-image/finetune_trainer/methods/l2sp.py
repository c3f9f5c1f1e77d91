"""L2-SP (Li, Grandvalet and Davoine 2018): stay close to the starting point.

The loss gains strength * sum ||w - w0||^2 over the trained weights, w0 the base model's. Its gradient
2 * strength * (w - w0) is added to the gradient of every tensor the optimizer steps, in a step pre-hook
of the torch optimizer: after the ranks' gradients are averaged, unscaled (fp16) and clipped, so the
penalty is independent of the loop's per-unit loss normalisation and of accumulation, and is not clipped
(as decoupled weight decay is not). The same code serves both engines because it anchors whatever the
optimizer steps:

- DDP steps the module's parameters: each rank keeps a copy of the trained weights (the run's members:
  with gradual unfreezing every block it will ever release, not a floor of frozen blocks).
- DeepSpeed ZeRO steps its fp32 master weights, and from stage 1 on each rank holds only its partition
  of them (ZeRO-3: only its partition of the weights at all). The anchor is a copy of that partition,
  taken when the engine is created, so a rank keeps 4 bytes per trained weight / world size, never a full
  copy of the model; the penalty's value is summed over the ranks' partitions.

Sequential stages create a new engine on the weights the last stage trained: the anchors of the first
engine are bound again by position (the optimizer's groups and ZeRO's partitions have the same layout
from stage to stage; a different shape is an error, not a silent new anchor). The first engine of a
process is always created on the base weights (a resumed run restores its checkpoint after that).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import distributed, events


class L2SP:
    def __init__(self, strength: float, anchor_device: str | None = None):
        self.strength = strength
        self.anchor_device = anchor_device  # None: next to the tensor it anchors; "cpu": host memory
        self.anchors: list[torch.Tensor] | None = None
        self.stepped: Callable[[], list[torch.Tensor]] = list
        self.partitioned = False
        self.partials: list[torch.Tensor | None] = []  # sum (w - w0)^2 per anchored tensor, at its last step
        self._hook = None

    @property
    def anchored_elements(self) -> int:
        """Weights this rank anchors (the anchor's memory is 4 bytes each in fp32)."""
        return sum(a.numel() for a in self.anchors or [])

    def attach(self, optimizer: torch.optim.Optimizer, stepped: Callable[[], list[torch.Tensor]],
               partitioned: bool) -> None:
        """Anchor the tensors `stepped()` returns (the first time) and add the penalty's gradient before every
        step of `optimizer`. partitioned: each rank steps only its share of the weights (ZeRO)."""
        tensors = stepped()
        if self.anchors is None:
            self.anchors = [t.detach().to(self.anchor_device or t.device, dtype=torch.float32, copy=True)
                            for t in tensors]
            events.emit("l2sp-anchor", anchoredElements=self.anchored_elements, partitioned=partitioned,
                        device=str(self.anchors[0].device) if self.anchors else None)
        elif [a.shape for a in self.anchors] != [t.shape for t in tensors]:
            raise RuntimeError(f"L2-SP: the new engine steps {len(tensors)} tensors of other shapes than the "
                               f"{len(self.anchors)} anchored at the start of the run")
        if self._hook is not None:
            self._hook.remove()
        self.stepped, self.partitioned = stepped, partitioned
        self.partials = [None] * len(self.anchors)
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        index = {id(t): i for i, t in enumerate(self.stepped())}
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:  # a block gradual unfreezing has not released yet
                    continue
                i = index.get(id(parameter))
                if i is None:
                    raise RuntimeError("L2-SP: the optimizer steps a tensor that has no anchor")
                diff = parameter.detach().float() - self.anchors[i].to(parameter.device, non_blocking=True)
                self.partials[i] = diff.pow(2).sum()
                parameter.grad.add_(diff.mul_(2.0 * self.strength).to(parameter.grad.dtype))

    def value(self, device: torch.device) -> float:
        """The penalty strength * sum ||w - w0||^2 at the last step; collective when partitioned (every rank
        calls it)."""
        local = [p for p in self.partials if p is not None]
        # summed where they are, read once (not one device sync per tensor)
        total = self.strength * float(torch.stack([p.to(local[0].device, torch.float64) for p in local]).sum()) if local else 0.0
        return distributed.sum_all([total], device)[0] if self.partitioned else total
