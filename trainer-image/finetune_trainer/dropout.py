"""Dropout per stage: a preference stage (an objective with reference log-probs: dpo, kto) trains with
dropout off, as TRL's DPOTrainer and KTOTrainer (`disable_dropout_in_model`), so the policy's
log-probs are comparable with the reference's; every other stage trains with the model's configured
dropout (the method's, e.g. `method.lora.dropout`, and the base model's own).

The configured rates are read once, from the model as built (base model plus method), and every
stage sets the rates it trains with from them: a stage's dropout depends on its own objective only,
never on the stages before it. So DPO followed by SFT trains the SFT stage with dropout on, exactly as
a run resumed into that SFT stage does (it builds a fresh model and skips the DPO stage).

Like TRL, this sets the `p` of the `torch.nn.Dropout` modules; a model's functional dropout (e.g. an
attention dropout read from its config) is not touched."""

from __future__ import annotations

import torch


def configured_rates(model) -> dict[str, float]:
    """The dropout rate of every dropout module of the model as built, by module name."""
    return {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}


def set_for_stage(model, rates: dict[str, float], preference: bool) -> None:
    """Dropout off for a preference stage, the configured rates for any other (a module that was not
    there when the rates were read keeps its own)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0 if preference else rates.get(name, module.p)
