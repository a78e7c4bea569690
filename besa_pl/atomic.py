"""Writing files and folders so that a crash never leaves a complete-looking result.

Everything besa-pl writes goes to a temporary name beside its target and is renamed into place
(a rename is atomic on one file system); a folder that exists is older than the new one until
the swap.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_file(path: str | Path, sync: bool = False):
    """Yield a temporary path; when the block succeeds it replaces `path`, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")


def swap_folder(staging: str | Path, folder: str | Path) -> None:
    """Rename a complete `staging` folder to `folder`, replacing an older one."""
    staging, folder = Path(staging), Path(folder)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old)
    else:
        os.replace(staging, folder)
