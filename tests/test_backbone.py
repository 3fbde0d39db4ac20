"""Loading a model changes nothing outside what it returns: no process-wide settings, no network."""

from __future__ import annotations

import os
import socket

import pytest

from fedlease.config import DEFAULT_MODEL
from fedlease.model.backbone import load_backbone
from fedlease.model.causal_lm import load_causal_lm


@pytest.mark.parametrize("which", ["folder", "packaged", "decoder"])
def test_loading_a_local_model_leaves_the_environment_alone_and_does_not_reach_out(tiny_model, tiny_causal_lm,
                                                                                   monkeypatch, which):
    """HF_HUB_OFFLINE set for the process made every later hub model of that process 'unreachable'; the local
    loads pass local_files_only instead, and never open a connection."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = dict(os.environ)
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    options = dict(rank=2, alpha=4.0, dropout=0.0, device="cpu")
    if which == "decoder":
        backbone = load_causal_lm(tiny_causal_lm, **options)
    else:
        backbone = load_backbone(tiny_model if which == "folder" else DEFAULT_MODEL, 3, **options)
    assert backbone.adapted.sites
    assert dict(os.environ) == before
    assert attempts == []
