"""Using what a run trained: a client's final model rebuilt (``load_client``), classifying texts with it
(``fedlease predict``) and exporting it for the Hugging Face ecosystem (``fedlease export``)."""

from fedlease.use.client import ClientModel, load_client, load_newcomer

__all__ = ["ClientModel", "load_client", "load_newcomer"]
