"""Parsing of comma-list settings (``layers`` ``0,2,4|all``, ``ks`` ``1,2,4,8``, ``hooks`` ...): one tested helper.

Typer has no list separator, so every comma list goes through :func:`parse_int_list`, whose errors say
which setting, which item, and the allowed range. The setting is named as :class:`mdiff.errors.MdiffError`'s
``option``; a caller (the CLI) may pass it spelt as its flag: leading dashes are dropped and inner dashes become
underscores, so the CLI shows its own flag again when it renders the error.
"""

from mdiff.errors import MdiffError


def setting_name(option: str) -> str:
    """A flag spelling (leading dashes, ``null-draws``) or ``null_draws`` → ``null_draws``: what an error carries."""
    return option.lstrip("-").replace("-", "_")


def parse_int_list(text: str, option: str, lo: int, hi: int, allow_all: bool = False,
                   what: str = "value") -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]`` (sorted, unique), each in ``lo..hi``; ``"all"`` → ``lo..hi`` when allowed.

    Ranges ``a-b`` and ``a:b`` (inclusive) are accepted too.
    """
    option = setting_name(option)
    t = (text or "").strip().lower()
    if not t:
        raise MdiffError("{option} is empty: give a comma list such as 1,2,4" + (" or all" if allow_all else ""),
                         option=option)
    if t == "all":
        if not allow_all:
            raise MdiffError("{option} does not take 'all': give a comma list such as 1,2,4", option=option)
        return list(range(lo, hi + 1))
    out: set[int] = set()
    for item in t.split(","):
        item = item.strip()
        if not item:
            raise MdiffError(f"{{option}} {text!r} has an empty item: use a comma list such as 1,2,4", option=option)
        for sep in ("-", ":"):
            if sep in item.lstrip("-"):
                a, b = item.split(sep, 1) if not item.startswith("-") else (item, "")
                try:
                    a_i, b_i = int(a), int(b)
                except ValueError:
                    raise MdiffError(f"{{option}}: {item!r} is not a number or a range a-b", option=option) from None
                if a_i > b_i:
                    raise MdiffError(f"{{option}}: range {item!r} is empty", option=option)
                if a_i < lo or b_i > hi:  # checked on the ends: a huge range is never expanded
                    raise MdiffError(f"{{option}}: range {item!r} goes outside the {what} range {lo}..{hi}",
                                     option=option)
                vals = range(a_i, b_i + 1)
                break
        else:
            try:
                vals = [int(item)]
            except ValueError:
                raise MdiffError(f"{{option}}: {item!r} is not a whole number (expected e.g. 1,2,4)",
                                 option=option) from None
        for v in vals:
            if not lo <= v <= hi:
                raise MdiffError(f"{{option}}: {what} {v} is out of range {lo}..{hi}", option=option)
            out.add(v)
    return sorted(out)


def parse_str_list(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    """``"resid_post,attn_out"`` → list, each checked against ``allowed`` (order kept, duplicates dropped)."""
    option = setting_name(option)
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise MdiffError(f"{{option}} is empty: choose from {', '.join(allowed)}", option=option)
    out = []
    for x in items:
        if x not in allowed:
            raise MdiffError(f"{{option}}: unknown {x!r}; choose from {', '.join(allowed)}", option=option)
        if x not in out:
            out.append(x)
    return out


def check_layers(layers, n_layers: int, option: str = "layers") -> None:
    """Every layer index must lie in ``0..n_layers-1`` (library-level check behind every RQ)."""
    for L in layers:
        if not 0 <= L < n_layers:
            raise MdiffError(f"{{option}}: layer {L} is out of range 0..{n_layers - 1}", option=option)
