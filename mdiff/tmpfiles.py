"""Temporary names for atomic writes, and whether a temporary was left by a process that is gone.

A file or folder is written under a temporary name, then renamed into place; a process killed in between leaves
the temporary behind, and the next writer of the same place removes it. The name says who wrote it,
``.<name>.tmp-<host>-<pid>``, because on a shared filesystem (a study on Ray or SLURM) a process on another
machine cannot tell whether that pid still runs: it leaves other hosts' temporaries alone, and never deletes a
file that a live unit elsewhere is writing. A name without a host (``.<name>.tmp-<pid>``, older runs) counts as
this host's.
"""

import glob
import os
import re
import shutil
import socket
from pathlib import Path


def host_tag() -> str:
    """This machine's name as it appears in temporary names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def tmp_path(path: Path) -> Path:
    """The temporary name this process writes ``path`` under."""
    return path.with_name(f".{path.name}.tmp-{host_tag()}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


def left_behind(tmp: Path) -> bool:
    """Whether the temporary ``tmp`` was left by a process of this machine that no longer runs (or by this one)."""
    host, _, pid = tmp.name.rsplit(".tmp-", 1)[-1].rpartition("-")
    if not pid.isdigit() or (host and host != host_tag()):
        return False  # not a temporary of ours, or another machine's: its writer may still be at work
    return int(pid) == os.getpid() or not pid_alive(int(pid))


def remove_stale_tmp(folder: Path, name: str | None = None) -> list[Path]:
    """Remove ``.<name>.tmp-<host>-<pid>`` folders/files (any name when ``name`` is None) in ``folder`` left by
    processes of this machine that no longer run (:func:`left_behind`); returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".{glob.escape(name) if name else '*'}.tmp-*"):
        if not left_behind(tmp):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
