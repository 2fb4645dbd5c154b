"""LLaVA-1.5 training (stage 1 pretrain, stage 2 SFT) on transformers' LlavaForConditionalGeneration.

config.py (settings), conversation.py (templates), data.py (LLaVA JSON -> batches), model.py (building
and freezing), trainer.py (one training process), sync.py (checkpoints to gs://), launch.py (torchrun),
trainjob.py (multi-node TrainJob, the default), kubeflow.py (PyTorchJob, and
the cluster settings of both), components.py (KFP parameters -> stage inputs).
The stage entry point is synthvlm.stages.train.train.

Importing this package is cheap: torch/transformers load with the modules that need them.
"""
