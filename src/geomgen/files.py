"""Writing outputs so that nobody sees half of one: a file written beside and
renamed, a package folder built beside and swapped in whole. Used by the
client (what comes back from the broker) and by the converter.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def resolved_within(path: str | os.PathLike, folder: str | os.PathLike) -> Path | None:
    """``path`` with symlinks and ``..`` resolved, if it is ``folder`` (resolved
    too) or lies below it; None if it lands anywhere else. The one rule for
    "only inside this folder": the gateway's allowed roots, a glTF's or OBJ's
    references, a package the broker sends back."""
    base = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(path))
    return target if target == base or base in target.parents else None


def write_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    # Write beside and rename, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished folder ``new`` to ``final``, replacing an older one
    there whole: no file of the old package is left beside the new one."""
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    """A fresh folder beside ``final`` to build its replacement in (same file
    system, so replace_dir is a rename)."""
    path = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    path.mkdir(parents=True)
    return path
