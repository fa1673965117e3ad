"""F10: the study as units of work, run here, on a local Ray cluster, or as submitit jobs: same bytes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mdiff.cli import app
from mdiff.errors import MdiffError

pytestmark = pytest.mark.slow
runner = CliRunner()
ARGS = ["--pair", "toy-lowrank", "--n", "40", "--bootstrap", "100", "--layers-per-unit", "3", "--threads", "1"]
RQS = ("rq1", "rq2", "rq3", "rq4")


def _study(out, *extra):
    r = runner.invoke(app, ["study", *ARGS, "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return r


def _same_results(a: Path, b: Path) -> None:
    for rq in RQS:
        for f in ("metrics.csv", "summary.json"):
            x, y = (a / "toy-lowrank" / rq / f).read_bytes(), (b / "toy-lowrank" / rq / f).read_bytes()
            assert x == y, f"{rq}/{f} differs"


@pytest.fixture(scope="module")
def local(toys, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    _study(out)
    return out


def test_plan_keys_and_status(local, tmp_path):
    from mdiff.io import pair_identity
    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig
    from mdiff.units import BLOCKED, DONE, READY, plan_units, unit_key

    spec, scfg = resolve_pair("toy-lowrank"), StudyConfig(n=40, n_boot=100, layers_per_unit=3)
    fresh = {u.name: u for u in plan_units(spec, scfg, tmp_path)}
    # RQ1 is split into pieces of one model each: both sides first, then each target × chunk of 3 layers
    pieces = [n for n in fresh if n.startswith("rq1:")]
    assert pieces == ["rq1:side:base", "rq1:side:tuned", "rq1:patch:tuned:L0-2", "rq1:patch:tuned:L3-5",
                      "rq1:patch:base:L0-2", "rq1:patch:base:L3-5"]  # the toy has 6 layers
    assert [fresh[n].status for n in pieces] == [READY] * 2 + [BLOCKED] * 4
    assert [fresh[n].side for n in pieces] == ["base", "tuned"] + ["tuned"] * 2 + ["base"] * 2
    assert fresh["rq1:patch:base:L3-5"].layers == (3, 4, 5)
    assert fresh["rq1"].status == BLOCKED and fresh["rq1"].key is not None  # the reduce waits for its pieces
    assert len({u.key for u in fresh.values() if u.key}) == len(pieces) + 1
    assert {fresh[s].status for s in ("rq2", "rq3", "rq4")} == {BLOCKED} and fresh["rq2"].key is None
    done = {u.step: u for u in plan_units(spec, scfg, local)}
    assert {u.status for u in done.values()} == {DONE}
    psha = pair_identity(spec)
    assert done["rq1"].key == fresh["rq1"].key == unit_key("toy-lowrank", "rq1", done["rq1"].settings, psha)
    for u in done.values():  # each unit left its part, keyed by what it did
        part = json.loads((local / "toy-lowrank" / "parts" / f"{u.key}.json").read_text())
        assert part["step"] == u.step and part["settings"] == json.loads(json.dumps(u.settings))
    assert unit_key("toy-lowrank", "rq1", {**done["rq1"].settings, "seed": 1}, psha) != done["rq1"].key
    assert unit_key("toy-lowrank", "rq1", done["rq1"].settings, "other prompts") != done["rq1"].key
    r = runner.invoke(app, ["units", *ARGS[:-2], "--out", str(local), "--json"])
    assert r.exit_code == 0 and [u["status"] for u in json.loads(r.output)] == ["done"] * 4, r.output


def test_rq2_and_rq4_pieces_after_rq1(local, tmp_path):
    """With RQ1 done, RQ2 is planned as its two sides (one model each), then one map-fitting unit per site (no model:
    no GPU asked), then the rq2 unit; RQ4 beside them as its base side, then its layers' heads patched into tuned
    in chunks of 3 layers, then the rq4 reduce (no model, no GPU)."""
    import shutil

    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig
    from mdiff.units import BLOCKED, DONE, READY, plan_units

    shutil.copytree(local / "toy-lowrank" / "rq1", tmp_path / "toy-lowrank" / "rq1")
    units = {u.name: u for u in plan_units(resolve_pair("toy-lowrank"),
                                           StudyConfig(n=40, n_boot=100, layers_per_unit=3, device="cuda"), tmp_path)}
    rq2 = [n for n in units if n.startswith("rq2:")]
    summary = json.loads((local / "toy-lowrank" / "rq1" / "summary.json").read_text())
    sites = sorted({*summary["suggested_probe_layers"], summary["suggested_control_layer"]})
    hooks = json.loads((local / "toy-lowrank" / "rq2" / "config.json").read_text())["settings"]["hooks"]
    assert rq2 == ["rq2:side:base", "rq2:side:tuned"] + [f"rq2:fit:L{L}:{h}" for L in sites for h in hooks]
    assert [units[n].status for n in rq2] == [READY, READY] + [BLOCKED] * (len(rq2) - 2)
    assert [units[n].gpus for n in rq2] == [1, 1] + [0] * (len(rq2) - 2)
    assert units["rq1"].status == DONE and units["rq2"].status == BLOCKED and units["rq4"].status == BLOCKED
    rq4 = [n for n in units if n.startswith("rq4:")]
    layers = sorted({*json.loads((local / "toy-lowrank" / "rq4" / "config.json").read_text())["settings"]["layers"], 0})
    chunks = [layers[i:i + 3] for i in range(0, len(layers), 3)]
    assert rq4 == ["rq4:side:base"] + [f"rq4:heads:L{c[0]}-{c[-1]}" for c in chunks]
    assert [units[n].status for n in rq4] == [READY] + [BLOCKED] * len(chunks)
    assert [units[n].side for n in rq4] == ["base"] + ["tuned"] * len(chunks)
    assert [units[n].gpus for n in rq4] == [1] * len(rq4) and units["rq4"].gpus == 0
    assert not units["rq4"].loads_model and units["rq2"].loads_model


def test_the_chunk_size_does_not_change_the_results(local, tmp_path):
    """RQ1 patched in chunks of 3 layers (the local fixture) and in one chunk of 8: the same bytes, RQ1 to RQ4
    (rounding noise is seeded per site; the reduce orders the pieces itself)."""
    _study(tmp_path, "--layers-per-unit", "8")
    _same_results(local, tmp_path)
    a, b = (d / "toy-lowrank" / "rq1" / "per_prompt_kl.csv" for d in (local, tmp_path))
    assert a.read_bytes() == b.read_bytes()


@pytest.fixture
def deadline():
    """A study on an engine that hangs (e.g. Ray tasks waiting for CPUs its actors hold) fails after 15 minutes
    instead of using up CI's time."""

    def expired(*_):
        raise TimeoutError("the study did not finish within 15 minutes: an executor waits forever")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(900)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _no_tmp(out: Path) -> None:
    """No half-written results: no temporary folder or file of a killed unit is left anywhere."""
    left = [p for p in out.rglob(".*") if ".tmp-" in p.name]
    assert not left, f"left behind: {left}"


def _all_done_with_parts(out: Path) -> None:
    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig
    from mdiff.units import DONE, plan_units, read_part

    ident = json.loads((out / "toy-lowrank" / "rq1" / "config.json").read_text())["pair_identity"]
    for u in plan_units(resolve_pair("toy-lowrank"), StudyConfig(n=40, n_boot=100, layers_per_unit=3), out):
        assert u.status == DONE and u.part, u
        assert read_part(out, "toy-lowrank", u.key, u.step, u.settings, ident)["adopted"] is False


def test_ray_study_with_a_killed_worker_equals_local_byte_for_byte(local, tmp_path, monkeypatch, deadline):
    """The Ray actor patching the tuned model dies in its first piece (the test-only hook in mdiff.units): Ray
    restarts it and retries its units, the study completes in one run, and every RQ's results are the local
    run's bytes."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'mdiff[ray]' (make test does)")
    from mdiff.units import TEST_DIE_VAR

    ray.shutdown()  # the local cluster is started below, with the hook in its workers' environment
    died = tmp_path / "died"
    monkeypatch.setenv(TEST_DIE_VAR, f"rq1:patch:tuned:{died}")
    try:
        _study(tmp_path / "out", "--executor", "ray", "--num-cpus", "2")
        assert died.exists()  # the worker did die once
        _same_results(local, tmp_path / "out")
        _no_tmp(tmp_path / "out")
        _all_done_with_parts(tmp_path / "out")
        # units asking for GPUs that a CPU-only cluster lacks are refused at once (Ray would wait forever)
        from mdiff.executors import RayExecutor
        from mdiff.units import UnitTask

        task = UnitTask("toy-lowrank", {"device": "cuda"}, str(tmp_path), "rq1", "0" * 16)
        with pytest.raises(MdiffError, match="GPU") as e:
            RayExecutor().run([task])
        assert "\n" not in str(e.value) and "--" not in str(e.value)
    finally:
        ray.shutdown()


def test_submitit_killed_job_is_reported_and_a_rerun_equals_local(local, tmp_path, monkeypatch, deadline):
    """The submitit job patching RQ4's heads into the tuned model dies mid-unit: the study reports it in one line
    naming the unit, keeps everything else and leaves no half result; the same command again runs only what RQ4
    still misses and ends with the local run's bytes."""
    pytest.importorskip("submitit", reason="submitit is not installed: pip install 'mdiff[slurm]' (make test does)")
    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig
    from mdiff.units import BLOCKED, DONE, READY, TEST_DIE_VAR, plan_units

    out, died = tmp_path / "out", tmp_path / "died"
    args = ["study", *ARGS, "--out", str(out), "--executor", "slurm", "--slurm-cluster", "local", "--timeout-min", "20"]
    monkeypatch.setenv(TEST_DIE_VAR, f"rq4:heads:{died}")
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and died.exists(), r.output
    units = {u.name: u for u in plan_units(resolve_pair("toy-lowrank"), StudyConfig(n=40, n_boot=100, layers_per_unit=3), out)}
    heads = [n for n in units if n.startswith("rq4:heads:")]
    assert {s: units[s].status for s in RQS} == {"rq1": DONE, "rq2": DONE, "rq3": DONE, "rq4": BLOCKED}
    assert units["rq4:side:base"].status == DONE and {units[n].status for n in heads} == {READY}
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and units[heads[0]].key in err[0] and f"(toy-lowrank {heads[0]})" in err[0], r.output
    assert "ended without a result" in err[0] and "Traceback" not in r.output
    assert not (out / "toy-lowrank" / "rq4").exists()
    _no_tmp(out)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"{heads[0]}: running" in r.output and "rq4:side:base: running" not in r.output
    assert "rq1: already done" in r.output
    _same_results(local, out)
    _no_tmp(out)
    _all_done_with_parts(out)


def test_done_comes_from_complete_folders_and_parts(local, tmp_path):
    """A part is the unit's receipt, the step folder its result: a folder written without a part (by hand) is done
    and the study writes its part; a part whose folder is gone or incomplete is not done; a wrong part is ignored."""
    import shutil

    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig
    from mdiff.units import BLOCKED, DONE, READY, UnitTask, part_path, plan_units, read_part, run_unit

    out = tmp_path / "out"
    shutil.copytree(local / "toy-lowrank", out / "toy-lowrank")
    shutil.rmtree(out / "toy-lowrank" / "parts")  # as if each RQ had been run by hand with the study's settings
    spec, scfg = resolve_pair("toy-lowrank"), StudyConfig(n=40, n_boot=100, layers_per_unit=3)
    units = {u.step: u for u in plan_units(spec, scfg, out)}
    assert all(u.status == DONE and not u.part for u in units.values())
    # a unit run again after its step was committed (an engine's retry) only writes its part (and RQ2's winners)
    (out / "toy-lowrank" / "rq2" / "winners.json").unlink()
    before = (out / "toy-lowrank" / "rq2" / "config.json").read_bytes()
    res = run_unit(UnitTask("toy-lowrank", scfg.to_dict(), str(out), "rq2", units["rq2"].key))
    assert res.ok and (out / "toy-lowrank" / "rq2" / "config.json").read_bytes() == before, res
    assert (out / "toy-lowrank" / "rq2" / "winners.json").is_file()
    assert json.loads(part_path(out, "toy-lowrank", units["rq2"].key).read_text())["adopted"] is True
    r = _study(out)
    assert r.output.count("already done") == 4 and "running" not in r.output
    ident = json.loads((out / "toy-lowrank" / "rq1" / "config.json").read_text())["pair_identity"]
    for u in units.values():
        part = read_part(out, "toy-lowrank", u.key, u.step, u.settings, ident)
        assert part is not None and part["adopted"] is True and part["folder"] == u.step
    _same_results(local, out)
    # a part without its folder, or with an incomplete one, is not done
    (out / "toy-lowrank" / "rq4" / "metrics.csv").unlink()
    shutil.rmtree(out / "toy-lowrank" / "rq3")
    now = {u.name: u for u in plan_units(spec, scfg, out)}
    assert (now["rq3"].status, now["rq4"].status) == (READY, BLOCKED) and now["rq1"].status == DONE
    assert now["rq4:side:base"].status == READY  # RQ4 is redone from its pieces (the folder came with none)
    assert part_path(out, "toy-lowrank", now["rq3"].key).is_file()
    # a part that records another unit is ignored, never trusted
    p = part_path(out, "toy-lowrank", now["rq1"].key)
    p.write_text(p.read_text().replace('"rq1"', '"rq2"'))
    assert next(u for u in plan_units(spec, scfg, out) if u.name == "rq1").part is False


def test_a_failing_unit_is_reported_and_nothing_else_is_lost(local, tmp_path, monkeypatch):
    """RQ4's reduce raises: one line names the rq4 unit's key and the message, RQ1-RQ3 and RQ4's pieces are kept,
    and the rerun runs only the reduce."""
    import mdiff.rq4 as R

    real = R.reduce_rq4

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(R, "reduce_rq4", broken)
    r = runner.invoke(app, ["study", *ARGS, "--out", str(tmp_path)])
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert "unit" in line and "rq4" in line and "disk on fire" in line
    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig
    from mdiff.units import plan_units

    key = next(u.key for u in plan_units(resolve_pair("toy-lowrank"), StudyConfig(n=40, n_boot=100, layers_per_unit=3), tmp_path)
               if u.name == "rq4")
    assert key in line
    for rq in ("rq1", "rq2", "rq3"):  # everything else ran and is kept
        assert (tmp_path / "toy-lowrank" / rq / "metrics.csv").is_file()
    assert not (tmp_path / "toy-lowrank" / "rq4").exists()
    study = json.loads((tmp_path / "toy-lowrank" / "study.json").read_text())
    assert {s["step"]: s["status"] for s in study["steps"]}["rq4"] == "failed"
    monkeypatch.setattr(R, "reduce_rq4", real)
    r = _study(tmp_path)  # the rerun runs only what is missing
    assert "rq4: running" in r.output and "rq4:heads" not in r.output and "rq4:side" not in r.output
    _same_results(local, tmp_path)


def test_a_killed_study_resumes_to_the_same_result(local, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mdiff.cli", "study", *ARGS, "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "toy-lowrank" / "rq1" / "config.json"
    t0 = time.time()
    while not marker.exists() and time.time() - t0 < 300 and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # now inside a later unit
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _study(tmp_path)
    _same_results(local, tmp_path)


def test_a_study_failing_in_a_fresh_out_says_why_in_one_line(toys, tmp_path):
    """rq1 fails (a chat prompt set on a pair without a chat template): the unit's own message, exit 2, no folder."""
    from mdiff import toy

    pair = tmp_path / "p.toml"
    pair.write_text(f'name = "nochat"\nbase = "{toy.toy_dir() / "base"}"\ntuned = "{toy.toy_dir() / "lowrank"}"\n'
                    f'prompts = "{toy.toy_dir() / "prompts-lowrank.jsonl"}"\n')
    r = runner.invoke(app, ["study", "--pair", str(pair), "--n", "20", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "chat_template" in err[0] and "(nochat rq1:side:base) failed" in err[0] and "Traceback" not in r.output
    assert not (tmp_path / "out" / "nochat").exists()


def test_a_changed_model_is_not_taken_as_done(local, tmp_path):
    """The same settings on another tuned model (or dtype, or prompt set): not "done", so not silently kept."""
    import dataclasses

    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig
    from mdiff.units import DONE, READY, plan_units

    spec = resolve_pair("toy-lowrank")
    other = dataclasses.replace(spec, tuned=resolve_pair("toy-distributed").tuned)
    units = {u.name: u for u in plan_units(other, StudyConfig(n=40, n_boot=100, layers_per_unit=3), local)}
    assert units["rq1"].status != DONE and units["rq1:side:base"].status == READY  # its pieces run again
    assert {u.step for u in plan_units(spec, StudyConfig(n=40, n_boot=100, layers_per_unit=3), local) if u.status == DONE} == set(RQS)
    bf = dataclasses.replace(spec, dtype="bfloat16")
    assert next(u for u in plan_units(bf, StudyConfig(n=40, n_boot=100, layers_per_unit=3), local)
                if u.name == "rq1:side:tuned").status == READY
