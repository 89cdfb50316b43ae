"""Whether a model's files are on this machine, asked without importing torch or transformers,
so that `plan` and `submit` load checkpoints only when there is something here to load."""

from __future__ import annotations

from pathlib import Path


def checkpoint_here(name_or_path: str) -> bool:
    """A local model folder, or a hub model whose config is in the Hugging Face cache."""
    return Path(name_or_path).is_dir() or in_hub_cache(name_or_path)


def in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id: nothing of it can be cached
        return False
