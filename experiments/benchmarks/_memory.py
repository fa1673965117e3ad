"""Resident memory of this process, read from Linux's ``/proc/self`` (shared by engines.py and scale.py)."""


def proc_status(keys: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """``/proc/self/status`` fields in bytes (``VmRSS``: resident now, ``VmHWM``: peak since the last reset);
    empty where there is no ``/proc`` (not Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs``, value 5); False where that is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
