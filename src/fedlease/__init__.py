"""fedlease: FedLEASE (adaptive LoRA experts allocation and selection for federated fine-tuning), its
baselines, and the runtimes that run them (in-process, Flower)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``fedlease.load_client`` and ``fedlease.load_newcomer``, imported when first used (importing fedlease stays
    light)."""
    if name in ("load_client", "load_newcomer"):
        import fedlease.use

        return getattr(fedlease.use, name)
    raise AttributeError(f"module 'fedlease' has no attribute {name!r}")
