"""Where besa-pl looks when it works offline: the hub probe, the data folder and the cache folder."""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
from pathlib import Path


def cache_dir() -> Path:
    """BESA_CACHE, else ~/.cache/besa-pl: where wheels and converted models live."""
    return Path(os.environ.get("BESA_CACHE", Path.home() / ".cache" / "besa-pl"))


def resolve_data_dir(data_dir: str | None) -> Path | None:
    folder = data_dir or os.environ.get("BESA_DATA_DIR")
    return Path(folder).expanduser() if folder else None


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: offline, the libraries would retry for a minute."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
