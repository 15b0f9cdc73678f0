"""kvray's cache directory: ``$KVRAY_CACHE_DIR``, else ``~/.cache/kvray``. Generated presets live
under ``presets/``, downloaded wheels under ``downloads/`` and the models taken out of them under
``models/``."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "KVRAY_CACHE_DIR"


def kvray_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvray"
