"""Using what a run trained: a client's final model rebuilt (``load_client``) or a newcomer's model placed by its
own data (``load_newcomer``), classifying texts or answering prompts with it (``fedlease predict``, ``fedlease
generate``) and exporting it for the Hugging Face ecosystem (``fedlease export``)."""

from fedlease.use.client import ClientModel, load_client, load_newcomer

__all__ = ["ClientModel", "load_client", "load_newcomer"]
