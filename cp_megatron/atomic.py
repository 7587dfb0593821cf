"""Write a file atomically: a temporary file in the same folder, then ``os.replace``, so a
reader sees the old file or the whole new one, never half of it (JSON, PNG figures); and
check before a job that a result path can be written at all.  Used by ``run --output``,
the benchmark suites and the plan plot (a leaf module: imports nothing of the package).

Source: POSIX rename(2) atomicity within one file system.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, then ``os.replace`` (mode 0666 & ~umask).

    Args:
        path: the file to write (missing folders are created).
        write: ``write(binary_file)`` fills the temporary file.

    Raises:
        OSError: the folder is not writable or the disk is full (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def output_file_problem(path) -> Optional[str]:
    """Why a result file cannot be written at ``path`` (None when it can): a directory, a
    file where a folder is needed, or a folder without write permission (missing folders
    are created when the file is written).  Checked before a job starts so that a bad path
    costs no run."""
    path = Path(path).absolute()
    if path.is_dir():
        return "is a directory; expected a file path"
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in folder {existing}"
    if path.exists() and not os.access(path, os.W_OK):
        return "file is not writable"
    return None


def write_json(path, data: dict) -> None:
    """``data`` as indented JSON at ``path`` (str or Path), atomically."""
    write_atomic(Path(path), lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as PNG at ``path``, atomically; the figure is closed."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    pyplot().close(fig)
