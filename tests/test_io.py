"""ResultWriter: earlier results are never destroyed, foreign folders never touched, failed runs leave nothing."""

import json
import os
import subprocess
import sys

import pytest

from mdiff.errors import MdiffError
from mdiff.io import ResultWriter, next_prev
from mdiff.tmpfiles import host_tag, remove_stale_tmp
from mdiff.tmpfiles import tmp_path as tmp_path_of


def _run(path, settings, payload, overwrite=False, said=None):
    w = ResultWriter(path, settings, overwrite, say=(said.append if said is not None else lambda m: None))
    with w:
        w.json("config.json", {"settings": settings, "provenance": {"time_utc": payload}})
        (w.file("metrics.csv")).write_text(payload)
        return w.commit(), w


def _metrics(p):
    return (p / "metrics.csv").read_text()


def test_every_earlier_result_is_kept_numbered(tmp_path):
    rq = tmp_path / "out" / "pair" / "rq1"
    said = []
    _run(rq, {"layers": [0, 4]}, "A")
    with pytest.raises(MdiffError, match=r"other settings \(differs in: layers\).*kept as rq1\.prev-1"):
        _run(rq, {"layers": [0, 2]}, "B")
    _run(rq, {"layers": [0, 2]}, "B", overwrite=True, said=said)
    assert _metrics(rq.with_name("rq1.prev-1")) == "A" and _metrics(rq) == "B"
    assert said == [f"kept the earlier results of {rq} as {rq.with_name('rq1.prev-1')}"]
    # the same command again without --overwrite: identical results, nothing to keep, the backup untouched
    said.clear()
    _run(rq, {"layers": [0, 2]}, "B", said=said)
    assert said == [] and not rq.with_name("rq1.prev-2").exists() and _metrics(rq.with_name("rq1.prev-1")) == "A"
    # same settings but other bytes (e.g. the model changed): the earlier run is kept too
    _run(rq, {"layers": [0, 2]}, "B2", said=said)
    assert _metrics(rq.with_name("rq1.prev-2")) == "B" and _metrics(rq) == "B2"
    # a second --overwrite never deletes an older backup
    _run(rq, {"layers": [1]}, "C", overwrite=True)
    assert [_metrics(rq.with_name(f"rq1.prev-{i}")) for i in (1, 2, 3)] == ["A", "B", "B2"]
    assert _metrics(rq) == "C"


def test_numbering_skips_legacy_and_gaps(tmp_path):
    rq = tmp_path / "rq2"
    assert next_prev(rq).name == "rq2.prev-1"
    (tmp_path / "rq2.prev").mkdir()
    assert next_prev(rq).name == "rq2.prev-1"
    (tmp_path / "rq2.prev-7").mkdir()
    (tmp_path / "rq2.prev-x").mkdir()
    assert next_prev(rq).name == "rq2.prev-8"


@pytest.mark.parametrize("content, why", [
    ({"notes.txt": "mine"}, "has no config.json"),
    ({"config.json": "{not json"}, "not valid JSON"),
    ({"config.json": "[1, 2]"}, "without mdiff settings"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_mdiff_did_not_write_is_never_touched(tmp_path, content, why, overwrite):
    rq = tmp_path / "pair" / "rq1"
    rq.mkdir(parents=True)
    for k, v in content.items():
        (rq / k).write_text(v)
    with pytest.raises(MdiffError) as e:
        _run(rq, {"a": 1}, "new", overwrite=overwrite)
    msg = str(e.value)
    assert why in msg and "move it elsewhere" in msg and "\n" not in msg
    assert sorted(p.name for p in (tmp_path / "pair").iterdir()) == ["rq1"]  # no tmp, no .prev
    assert {p.name: p.read_text() for p in rq.iterdir()} == content


def test_an_empty_folder_is_replaced(tmp_path):
    rq = tmp_path / "rq1"
    rq.mkdir()
    _run(rq, {"a": 1}, "new")
    assert _metrics(rq) == "new" and not next_prev(rq).name.endswith("-2")
    assert not rq.with_name("rq1.prev-1").exists()


def test_a_folder_that_appears_during_the_run_is_not_moved(tmp_path):
    rq = tmp_path / "rq1"
    w = ResultWriter(rq, {"a": 1}, say=lambda m: None)
    w.json("config.json", {"settings": {"a": 1}})
    rq.mkdir()
    (rq / "user.txt").write_text("mine")
    with pytest.raises(MdiffError, match="appeared during this run"):
        w.commit()
    w.abort()
    assert (rq / "user.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["rq1"]


def test_failed_run_leaves_no_folders(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ResultWriter(out / "pair" / "rq1", {"a": 1}):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (out / "pair" / "activations").mkdir(parents=True)  # folders written by someone else stay
    with pytest.raises(KeyboardInterrupt):
        with ResultWriter(out / "pair" / "rq1", {"a": 1}):
            raise KeyboardInterrupt
    assert sorted(p.name for p in (out / "pair").iterdir()) == ["activations"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".rq1.tmp-{dead.pid}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x.csv").write_text("x")
    alive = tmp_path / f".rq1.tmp-{os.getppid()}"
    alive.mkdir()
    other = tmp_path / f".rq2.tmp-{dead.pid}"
    other.mkdir()
    # on a shared filesystem: the same dead pid on another machine may be a live writer there, so it stays
    elsewhere = tmp_path / f".rq1.tmp-other-node-7-{dead.pid}"
    elsewhere.mkdir()
    mine = tmp_path / f".rq1.tmp-{host_tag()}-{dead.pid}"
    mine.mkdir()
    _run(tmp_path / "rq1", {"a": 1}, "new")
    assert not stale.exists() and not mine.exists() and alive.exists() and other.exists() and elsewhere.exists()
    assert remove_stale_tmp(tmp_path) == [other] and not other.exists() and elsewhere.exists()
    assert tmp_path_of(tmp_path / "x").name == f".x.tmp-{host_tag()}-{os.getpid()}"


def test_out_that_is_a_file_or_escapes(tmp_path):
    f = tmp_path / "results"
    f.write_text("I am a file")
    with pytest.raises(MdiffError, match=r"it is a file, not a folder; choose another output folder \(out\)"):
        ResultWriter(f / "pair" / "rq1", {})
    with pytest.raises(MdiffError, match="goes up with '..'"):
        ResultWriter(tmp_path / "out" / ".." / ".." / "x" / "rq1", {})
    w = ResultWriter(tmp_path / "ok" / "rq1", {})
    with pytest.raises(MdiffError, match="must stay inside"):
        w.file("../escape.csv")
    w.abort()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_out(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(MdiffError, match="cannot write results under"):
            ResultWriter(ro / "pair" / "rq1", {})
    finally:
        ro.chmod(0o700)


def test_config_json_time_is_not_a_difference(tmp_path):
    rq = tmp_path / "rq1"
    said = []
    w = ResultWriter(rq, {"a": 1}, say=said.append)
    w.json("config.json", {"settings": {"a": 1}, "provenance": {"time_utc": "t1"}})
    w.commit()
    w = ResultWriter(rq, {"a": 1}, say=said.append)
    w.json("config.json", {"settings": {"a": 1}, "provenance": {"time_utc": "t2"}})
    w.commit()
    assert said == [] and json.loads((rq / "config.json").read_text())["provenance"]["time_utc"] == "t2"


def test_unwritable_out_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(MdiffError, match=r"cannot write results under .*Permission denied; choose another output folder"):
        ResultWriter(tmp_path / "ro" / "pair" / "rq1", {})


def test_html_figures_are_byte_reproducible(tmp_path):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[0.5, 0.25, 0.125]))
    pages = []
    for i in range(2):
        w = ResultWriter(tmp_path / f"r{i}", {"a": 1})
        w.figure("cka.html", fig)
        pages.append(w.commit() / "cka.html")
    assert pages[0].read_bytes() == pages[1].read_bytes()
    assert 'id="mdiff-cka"' in pages[0].read_text()
