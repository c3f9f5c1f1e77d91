"""L2-SP (Li, Grandvalet and Davoine 2018): stay close to the starting point.

The step's loss gains strength * sum ||w - w0||^2 over the trained weights, w0 the base model's. Its
gradient 2 * strength * (w - w0) is added to each parameter's gradient once per optimizer step, after
the ranks' gradients are averaged (and unscaled, under fp16) and before clipping: the same as adding the
penalty to the loss, but independent of the loop's per-unit loss normalisation and of accumulation.

Memory: w0 is kept only for the parameters the run will ever train (not for a floor of frozen blocks),
on the accelerator or, with anchorDevice cpu, in host memory, copied over one tensor at a time. Under
DDP every rank holds the full model and so its own w0. DeepSpeed is refused (validation.py): ZeRO owns
the gradients in its own flat buffers; under ZeRO-3 each rank would have to anchor only its partition
(param.ds_tensor) and add the penalty there, which is not implemented.
"""

from __future__ import annotations

import torch


class L2SP:
    def __init__(self, module, strength: float, names: set[str], device: str | torch.device | None = None):
        self.strength = strength
        self.device = device  # None: next to each parameter (moved there at the first step)
        self.value = 0.0  # the penalty at the last step (for the step event)
        self.anchor = {name: p.detach().to(device or p.device, copy=True)
                       for name, p in module.named_parameters() if name in names}

    def penalty(self, module) -> torch.Tensor:
        """strength * sum ||w - w0||^2 over the parameters that train now, differentiable."""
        terms = [(p - self.anchor[n].to(p.device)).pow(2).sum()
                 for n, p in module.named_parameters() if p.requires_grad and n in self.anchor]
        return self.strength * torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def add_gradient(self, module) -> None:
        total = None
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad or name not in self.anchor:
                continue
            anchor = self.anchor[name]
            if self.device is None and anchor.device != parameter.device:
                anchor = self.anchor[name] = anchor.to(parameter.device)
            diff = parameter.detach().float() - anchor.to(parameter.device, non_blocking=True).float()
            squared = diff.pow(2).sum()
            total = squared if total is None else total + squared
            gradient = diff.mul_(2.0 * self.strength).to(parameter.dtype)
            if parameter.grad is None:
                parameter.grad = gradient
            else:
                parameter.grad.add_(gradient)
        self.value = self.strength * float(total) if total is not None else 0.0
