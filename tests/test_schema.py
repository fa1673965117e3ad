"""The results' schema: names declared once, conditions that round-trip, readers that refuse what is not a result."""

import re
import tokenize
from pathlib import Path

import pandas as pd
import pytest

from mdiff import schema as S
from mdiff.errors import MdiffError

ROOT = Path(__file__).resolve().parents[1] / "mdiff"


def test_rq2_condition_round_trip():
    conds = pd.Series([S.rq2_condition("ridge", 0.5, "blend"), S.rq2_condition("reverse:ridge@decision", 1.0, "scale"),
                       S.rq2_condition("shuffled:procrustes", 0.25, "blend")])
    assert list(conds) == ["ridge|alpha=0.5|blend", "reverse:ridge@decision|alpha=1.0|scale",
                           "shuffled:procrustes|alpha=0.25|blend"]
    p = S.rq2_condition_parts(conds)
    assert list(p.solver) == ["ridge", "reverse:ridge@decision", "shuffled:procrustes"]
    assert list(p.alpha) == [0.5, 1.0, 0.25] and list(p["mode"]) == ["blend", "scale", "blend"]


def test_select_and_read_metrics(tmp_path):
    df = pd.DataFrame({"metric": [S.PATCH_KL, S.PATCH_KL, S.CKA], "condition": [S.CROSS_B2T, S.CROSS_T2B, S.CKA_COND],
                       "hook": ["attn_out"] * 3, "value": [1.0, 2.0, 0.9]})
    assert list(S.select(df, S.PATCH_KL, condition=S.CROSS_T2B).value) == [2.0]
    (tmp_path / "p" / "rq1").mkdir(parents=True)
    df.to_csv(tmp_path / "p" / "rq1" / "metrics.csv", index=False)
    assert S.read_metrics(tmp_path, "p", "rq1").equals(df)
    df.drop(columns="metric").to_csv(tmp_path / "p" / "rq1" / "metrics.csv", index=False)
    with pytest.raises(MdiffError, match="not an mdiff result table .*metric"):
        S.read_metrics(tmp_path, "p", "rq1")
    with pytest.raises(MdiffError, match="cannot be read"):
        S.read_metrics(tmp_path, "p", "rq2")


def test_no_metric_name_is_spelled_out_of_the_schema():
    """Modules compare and write metric names through mdiff.schema, never as literals of their own."""
    names = {v for k, v in vars(S).items() if k.isupper() and isinstance(v, str)} - {"|"}
    pat = re.compile(r"""metric["'\]]*\s*(==|:|!=)\s*$""")
    offenders = []
    for path in sorted(ROOT.glob("*.py")):
        if path.name == "schema.py":
            continue
        with tokenize.open(path) as fh:
            toks = [t for t in tokenize.generate_tokens(fh.readline)
                    if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
        for i, t in enumerate(toks):
            if t.type == tokenize.STRING and t.string.strip("\"'") in names and i >= 2:
                before = "".join(x.string for x in toks[max(0, i - 4):i])
                if pat.search(before):
                    offenders.append(f"{path.name}:{t.start[0]}: {t.string}")
    assert not offenders, offenders
