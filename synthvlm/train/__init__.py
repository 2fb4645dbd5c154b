"""LLaVA-1.5 training (stage 1 pretrain, stage 2 SFT) on transformers' LlavaForConditionalGeneration.

config.py (settings), conversation.py (templates), data.py (LLaVA JSON -> batches), model.py (building
and freezing), trainer.py (one training process), sync.py (checkpoints to gs://), launch.py (torchrun),
kubeflow.py (multi-node PyTorchJob), components.py (KFP parameters -> stage inputs).
The stage entry point is synthvlm.stages.train.train.

Importing this package is cheap: torch/transformers load with the modules that need them.
"""
