"""fedlease: FedLEASE (adaptive LoRA experts allocation and selection for federated fine-tuning), its
baselines, and the runtimes that run them (in-process, Flower)."""

__version__ = "0.1.0"
