"""kto: Kahneman-Tversky optimisation (Ethayarajh et al., 2024) on feedback rows, each a completion
labelled desirable or undesirable, against the model as it was when the stage started.

With r = log pi(completion | prompt) - log pi_ref(completion | prompt) and the reference point
z = max(0, mean over the batch of the same log-ratio for mismatched (prompt, other row's completion)
pairs), detached, the loss of a row is

    desirable:   desirableWeight   * (1 - sigmoid(beta * (r - z)))
    undesirable: undesirableWeight * (1 - sigmoid(beta * (z - r)))

as TRL's KTOTrainer (loss_type "kto"); beta is hyperparameters.ktoBeta. Like DPO here, the reference
log-probs (of the completion and of the mismatched pair) are computed once per stage before its
first step and travel in the batch and the checkpoints, and dropout is off while the stage trains.
As in TRL, the mismatched pairs run in a forward of their own under torch.no_grad(), before the rows':
z is detached, so their activations are neither kept nor run through backward (the reference pass
runs the same two forwards, `pair_log_probs`).

Differences from TRL's KTOTrainer:
- The mismatched pairs: TRL rotates completions by one within each chunk of per_device_train_batch_size
  rows of the dataset, before shuffling; here every training row of the stage gets another row's
  completion by a seeded cycle through all the stage's rows (pipeline.pair_for_kl), so there is no
  batch-size-1 degenerate case (a stage needs 2 rows), and the pair does not depend on the batch size.
- z is the mean over the mismatched pairs of the micro-batch on every rank (sums all-reduced); TRL
  averages the per-process means, the same when every process holds as many rows.
- The loss is the mean over every row of the optimizer step, across micro-batches and ranks (see
  train.run_loop); TRL takes the mean per micro-batch.
- Metrics are sums divided by the step's rows, like every metric here: `kl` is z; `rewards/desirable`
  and `rewards/undesirable` are the sums of beta * r over the rows of that label, and `count/desirable`
  the share of desirable rows, so rewards/desirable / count/desirable is the mean desirable reward
  (TRL logs per-label sums and counts).
- Only TRL's default loss_type "kto" with the KL term (no apo_zero_unpaired, no calculate_KL=False);
  the desirable/undesirable balance is reported in the data report (`feedback`), not warned about.
- Validation perplexity is that of the desirable completions given their prompts.
- Rows (data/formats.py, data/tokenize.py): a feedback row's prompt and completion are strings; a
  conversational row (prompt and completion as lists of messages), which TRL accepts, is a bad row
  ("field 'prompt' must be a string", or 'completion'). With a chat template, the plain-string prompt is rendered
  as a [user] turn with the generation prompt and the completion as the assistant turn, ending with
  the template's end of turn and no EOS after it; TRL applies the template only to conversational
  rows, tokenizes plain strings as they are, and appends EOS to every completion (and prepends the
  tokenizer's BOS where it has one; here the template or the tokenizer's own special tokens decide).
  Without a chat template both take the raw strings and end the completion with EOS.
- Truncation (tokenize.truncate): a row longer than preprocessing.maxSeqLength loses the start of
  its prompt down to what the completion leaves, but keeps at least maxSeqLength // 2 prompt tokens,
  then the completion is cut to what the prompt leaves; TRL cuts the prompt to max_prompt_length
  (its end, truncation_mode "keep_end" by default), then the completion to max_length -
  max_prompt_length.
- The reference when continuing from method.adapter: the model as the stage starts, i.e. the base
  with the loaded adapter (run.py); TRL's default for a PEFT model without ref_model is the base with
  the adapter disabled. (With a fresh LoRA both are the base; fresh prefix or prompt tuning takes the
  base here too.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed
from . import ObjectiveSpec, register
from .common import IGNORE, language_model_batch, sequence_log_probs


def _rows(items, pad_id: int, completion: str, trained=lambda item: True) -> dict:
    input_ids, masks = [], []
    for item in items:
        ids = getattr(item, completion)
        if not ids:
            raise ValueError("a feedback row without its mismatched completion: pipeline.pair_for_kl pairs every "
                             "training row")
        input_ids.append(item.prompt_ids + ids)
        masks.append([0] * len(item.prompt_ids) + [int(trained(item))] * len(ids))
    return language_model_batch(input_ids, masks, pad_id)


def collate(items, pad_id: int) -> dict:
    """The rows' (prompt, completion) first, then their mismatched (prompt, other completion), in one batch
    (dpo.collate's layout); the log-probs of each half come from a forward of its own (`pair_log_probs`)."""
    matched, mismatched = _rows(items, pad_id, "completion_ids"), _rows(items, pad_id, "kl_completion_ids")
    width = max(matched["input_ids"].shape[1], mismatched["input_ids"].shape[1])

    def widen(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    batch = {key: torch.cat([widen(matched[key], v), widen(mismatched[key], v)])
             for key, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE))}
    batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
    references = [getattr(i, "reference", None) for i in items]
    if all(r is not None for r in references):
        batch["reference_log_probs"] = torch.tensor([r[0] for r in references] + [r[1] for r in references])
    return batch


def real_rows(batch: dict) -> torch.Tensor:
    """Per row: whether it has targets (a filler row that keeps the ranks in step has none)."""
    half = batch["labels"].shape[0] // 2
    return (batch["labels"][:half, 1:] != IGNORE).any(-1)


def rows(batch: dict) -> int:
    return int(real_rows(batch).sum())


def reference_point(kl_log_ratios: torch.Tensor, valid: torch.Tensor) -> float:
    """z: the mean log-ratio of the mismatched pairs over every rank's real rows, at least 0."""
    total, count = distributed.sum_all([float((kl_log_ratios.detach() * valid).sum()), float(valid.sum())],
                                       kl_log_ratios.device)
    return max(total / count, 0.0) if count else 0.0


def kto_losses(log_ratios: torch.Tensor, desirable: torch.Tensor, z: float, hyperparameters) -> torch.Tensor:
    """Per row: the weighted KTO loss of its log-ratio r against the reference point z."""
    beta = hyperparameters.ktoBeta
    return torch.where(desirable,
                       hyperparameters.desirableWeight * (1 - torch.sigmoid(beta * (log_ratios - z))),
                       hyperparameters.undesirableWeight * (1 - torch.sigmoid(beta * (z - log_ratios))))


def batch_half(batch: dict, mismatched: bool) -> dict:
    """The rows (prompt, completion) or their mismatched pairs of a collated batch, cut to their own width
    (rows are right-padded)."""
    middle = batch["input_ids"].shape[0] // 2
    rows = slice(middle, None) if mismatched else slice(0, middle)
    width = int(batch["attention_mask"][rows].sum(-1).max())
    return {key: batch[key][rows, :width] for key in ("input_ids", "attention_mask", "labels")}


def kl_log_probs(model, batch: dict) -> torch.Tensor:
    """Per row: the log-prob of its mismatched completion, without gradient (z is detached anyway, so a
    graph of these rows would be kept and run through backward for nothing; TRL computes them under
    no_grad too). A forward of its own, on every rank (ZeRO-3 gathers the parameters in every forward)."""
    with torch.no_grad():
        return sequence_log_probs(model, batch_half(batch, mismatched=True))


def pair_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the log-probs of its completion and of its mismatched completion, each half in a forward of
    its own as in `loss`, so the stage's reference pass (run.py, under no_grad) runs the forwards the policy does."""
    return sequence_log_probs(model, batch_half(batch, mismatched=False)), kl_log_probs(model, batch)


def loss(model, batch: dict, hyperparameters) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed KTO loss over the batch's rows, and the sums of its metrics."""
    policy_mismatched = kl_log_probs(model, batch)  # first: its activations are gone before the graph is built
    policy = sequence_log_probs(model, batch_half(batch, mismatched=False))
    reference = batch["reference_log_probs"].to(policy.device, policy.dtype)
    half = reference.shape[0] // 2
    valid = real_rows(batch).to(policy.device).float()
    desirable = batch["desirable"].to(policy.device)
    z = reference_point(policy_mismatched - reference[half:], valid)
    log_ratios = policy - reference[:half]
    rewards = hyperparameters.ktoBeta * log_ratios.detach() * valid
    metrics = {"kl": z * float(valid.sum()),
               "rewards/desirable": float(rewards[desirable].sum()),
               "rewards/undesirable": float(rewards[~desirable].sum()),
               "count/desirable": float((desirable.float() * valid).sum())}
    return (kto_losses(log_ratios, desirable, z, hyperparameters) * valid).sum(), metrics


def eval_collate(items, pad_id: int) -> dict:
    """Validation perplexity of a feedback set: the desirable completions given their prompts."""
    return _rows(items, pad_id, "completion_ids", trained=lambda item: item.desirable)


SPEC = register(ObjectiveSpec("kto", collate, loss, eval_collate=eval_collate, units=rows,
                              reference_log_probs=pair_log_probs))
