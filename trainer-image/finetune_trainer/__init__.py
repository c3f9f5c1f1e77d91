"""finetune_trainer: the fine-tuning engine that runs inside the PyTorchJob pods.

`config` and `exit_codes` import nothing heavy (the operator imports them); everything else
needs torch.
"""
