"""The three-stage trainer: model assembly (``model``), WebDataset loading and collation (``data``),
the loop with checkpoints and resumption (``loop``), stage configs (``config``), chat templates.

``facemllm train CONFIG`` or ``torchrun --nproc_per_node N -m facemllm.training CONFIG``; see the README's
"Training in three stages". Heavy imports (torch, transformers) happen in the submodules only.
"""
