"""synthvlm: synthetic vision-language training data as Kubeflow Pipelines."""

__version__ = "0.1.0"
