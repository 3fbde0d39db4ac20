"""The Flower runtime: a ServerApp and a ClientApp that run every method through the same method code and the
same round loop as the in-process runner (``fedlease.runtime.loop``), in Flower simulation or deployment."""
