"""Is the Hugging Face hub reachable? Asked once per process, answered within seconds.

Offline is the normal case for this project, so nothing may wait on the hub's own retries: a run that needs
the hub and cannot reach it must stop at once with a message that names the offline alternatives.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants, get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any failure to connect means: not reachable
        return False
    return True
