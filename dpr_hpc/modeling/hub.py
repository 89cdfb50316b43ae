"""Hub models checked before anything is queued: a misspelt or uncached model would otherwise
fail inside the job, after its wait in the queue.

Only the local Hugging Face cache is read (no network): offline (`HF_HUB_OFFLINE` or
`TRANSFORMERS_OFFLINE`), a model absent from it cannot load anywhere that shares this cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from huggingface_hub import try_to_load_from_cache

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def hub_cache_dir() -> Path:
    """Where the hub cache is now (read at each call: huggingface_hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_cached(model: str) -> bool:
    """Whether the model's config.json is in the local cache (any valid checkout has one)."""
    try:
        found = try_to_load_from_cache(model, "config.json", cache_dir=hub_cache_dir())
    except ValueError:  # not a valid repository id, so never in the cache
        return False
    return isinstance(found, str)


def uncached(models: Iterable[str]) -> list[str]:
    return sorted({m for m in models if not is_cached(m)})
