"""Where derived files are cached (domain networks, reference statistics, latents, captions)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$NRDM_CACHE, or ~/.cache/nrdm."""
    return Path(os.environ.get("NRDM_CACHE", Path.home() / ".cache" / "nrdm"))
