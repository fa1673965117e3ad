"""The reliability matrix: bad input, damaged files and reruns through the CLI.

Every case runs a real command against an ``--out`` that already holds a finished RQ1 run and asserts: exit
status 2, exactly one line of message (``error: ...``, no traceback), the expected words, and that every
file of the earlier run is still on disk, byte for byte. Cases that must *succeed* (numbered backups, a
changed model collected anew) have their own tests below.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mdiff.cli import app

pytestmark = pytest.mark.slow

RQ1 = ["--layers", "0,4", "--n", "8", "--bootstrap", "10", "--threads", "1"]


def _invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _toml(path: Path, tuned: str = "tuned", prompts: str = "prompts.jsonl", **extra) -> Path:
    lines = [f'name = {json.dumps(extra.pop("name", "mine"))}', 'base = "base"', f'tuned = "{tuned}"',
             f'prompts = "{prompts}"', f'chat_template = {json.dumps(extra.pop("chat_template", True))}']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _copy_pair(toys, dest: Path) -> Path:
    spec = toys["toy-lowrank"]
    dest.mkdir(parents=True)
    shutil.copytree(spec.base, dest / "base")
    shutil.copytree(spec.tuned, dest / "tuned")
    shutil.copy(spec.prompts, dest / "prompts.jsonl")
    return _toml(dest / "pair.toml")


@pytest.fixture(scope="module")
def pairdir(toys, tmp_path_factory):
    """A copy of toy-lowrank as a pair file, plus damaged variants of its tuned model."""
    d = tmp_path_factory.mktemp("pair")
    _copy_pair(toys, d / "p")
    d = d / "p"
    shutil.copytree(d / "tuned", d / "tuned_trunc")
    w = d / "tuned_trunc" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    shutil.copytree(d / "tuned", d / "tuned_pickle")
    from safetensors.torch import load_file

    sd = load_file(str(d / "tuned" / "model.safetensors"))
    (d / "tuned_pickle" / "model.safetensors").unlink()
    sd["extra"] = _Evil()
    torch.save(sd, d / "tuned_pickle" / "pytorch_model.bin")
    return d


class _Evil:
    """A pickled object that would run code if unpickled: the weights-only loader must refuse it."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.fixture(scope="module")
def earlier(pairdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier") / "out"
    r = _invoke(["rq1", "--pair", pairdir / "pair.toml", *RQ1, "--out", out])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def out(earlier, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(earlier, dst)
    return dst


# each case: (command and options, needle, set-up(out, pairdir, tmp) -> extra args or None)
def _foreign_rq2(out, pd, tmp):
    (out / "mine" / "rq2").mkdir()
    (out / "mine" / "rq2" / "notes.txt").write_text("my own notes")


def _corrupt_config(out, pd, tmp):
    (out / "mine" / "rq1" / "config.json").write_text('{"settings": {"layers": [0, 4]')


def _out_file(out, pd, tmp):
    (tmp / "afile").write_text("not a folder")
    return ["--out", tmp / "afile"]


def _named(name):
    def setup(out, pd, tmp):
        return ["--pair", _toml(pd / f"named-{abs(hash(name))}.toml", name=name)]
    return setup


def _tuned(folder):
    def setup(out, pd, tmp):
        return ["--pair", _toml(pd / f"{folder}.toml", tuned=folder)]
    return setup


def _with_long_prompt(pd: Path) -> Path:
    """The pair's prompts with a 20k-character prompt (~3,600 tokens; the toy models have 128 positions) first."""
    rows = [json.loads(ln) for ln in (pd / "prompts.jsonl").read_text().splitlines() if ln.strip()]
    long = {"id": "long-0", "messages": [{"role": "user", "content": " ".join(["astana is the capital"] * 900)}]}
    (pd / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [long, *rows]))
    return pd / "long.jsonl"


def _long(out, pd, tmp):
    _with_long_prompt(pd)
    return ["--pair", _toml(pd / "long.toml", prompts="long.jsonl")]


def _template(out, pd, tmp):
    return ["--pair", _toml(pd / "tmpl.toml", chat_template="{{ messages.__class__.__mro__ }}")]


CASES = {
    "other settings": (["rq1", *RQ1, "--bootstrap", "11"], "holds results of a run with other settings", None),
    "folder mdiff did not write": (["rq2", "--n", "8", "--bootstrap", "10", "--threads", "1"],
                                   "rq2 exists but has no config.json", _foreign_rq2),
    "corrupted config.json, --overwrite": (["rq1", *RQ1, "--bootstrap", "11", "--overwrite"],
                                           "config.json that is not valid JSON", _corrupt_config),
    "report of a corrupted rq folder": (["report"], "cannot be read", _corrupt_config),
    "--out is a file": (["rq1", *RQ1], "it is a file, not a folder; choose another output folder (--out)",
                        _out_file),
    "name ../../x": (["rq1", *RQ1], "must be a plain folder name", _named("../../escaped")),
    "name /abs/path": (["rq1", *RQ1], "must be a plain folder name", _named("/tmp/mdiff-escaped-abs")),
    "--seed -1": (["rq1", *RQ1, "--seed", "-1"], "--seed must be a whole number in 0..", None),
    "--device tpu": (["rq1", *RQ1, "--device", "tpu"], "--device 'tpu' is not a torch device", None),
    "--batch-size 0": (["rq1", *RQ1, "--batch-size", "0"], "--batch-size must be ≥ 1", None),
    "--threads 0": (["rq1", *RQ1, "--threads", "0"], "--threads must be ≥ 1", None),
    "--bootstrap 0": (["rq1", *RQ1, "--bootstrap", "0"], "--bootstrap", None),
    "--n 0": (["rq1", *RQ1, "--n", "0"], "--n must be ≥ 1", None),
    "--layers 99": (["rq1", *RQ1, "--layers", "99"], "--layers: layer 99 is out of range", None),
    "--control-layer 99": (["rq2", "--n", "8", "--control-layer", "99"], "--control-layer: layer 99 is out of range",
                           None),
    "rq3 --layer 99": (["rq3", "--layer", "99", "--n", "8"], "--layer: layer 99 is out of range", None),
    "rq4 --control-layer 99": (["rq4", "--layer", "2", "--n", "8", "--control-layer", "99"],
                               "--control-layer: layer 99 is out of range", None),
    "study --seed -1": (["study", "--n", "8", "--seed", "-1"], "--seed must be a whole number in 0..", None),
    "collect into a file": (["collect", "--n", "4"], "cannot write activations under", _out_file),
    "collect --device tpu": (["collect", "--n", "4", "--device", "tpu"], "--device 'tpu' is not a torch device",
                             None),
    "truncated weights": (["rq1", *RQ1], "weights cannot be read (SafetensorError", _tuned("tuned_trunc")),
    "pickled weights": (["rq1", *RQ1], "pickled file that the weights-only loader refuses", _tuned("tuned_pickle")),
    "prompt longer than the context": (["rq1", *RQ1], "1 of 8 prompts are longer than the models' context of 128 "
                                                      "positions (the longest, 'long-0', has", _long),
    "chat template rejected by the sandbox": (["rq1", *RQ1], "the chat template cannot render prompt",
                                              _template),
}
if not torch.cuda.is_available():
    CASES["--device cuda without CUDA"] = (["rq1", *RQ1, "--device", "cuda"], "use --device cpu", None)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_keeps_earlier_results(case, out, pairdir, tmp_path, monkeypatch):
    args, needle, setup = CASES[case]
    monkeypatch.chdir(tmp_path)  # a relative path that escaped would land here
    extra = (setup(out, pairdir, tmp_path) if setup else None) or []
    before = _snapshot(out)
    outside = sorted(p.name for p in tmp_path.iterdir())
    cmd = [args[0], "--pair", pairdir / "pair.toml", "--out", out, *args[1:], *extra]
    r = _invoke(cmd)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    assert "Traceback" not in r.output
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # every earlier file, byte for byte
    assert not [k for k in after if k not in before and not k.startswith("mine/activations/")]
    assert sorted(p.name for p in tmp_path.iterdir()) == outside  # nothing written next to --out
    assert not Path("/tmp/mdiff-escaped-abs").exists() and not (tmp_path.parent / "escaped").exists()
    assert not (pairdir / "PWNED").exists() and not Path("PWNED").exists()


def test_interrupt_is_one_line(out, pairdir, monkeypatch):
    import mdiff.rq1

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mdiff.rq1, "run_rq1", interrupted)
    before = _snapshot(out)
    r = _invoke(["rq1", "--pair", pairdir / "pair.toml", "--out", out, *RQ1, "--bootstrap", "11"])
    assert r.exit_code == 130 and r.output.strip() == "interrupted; rerun the same command to resume"
    assert _snapshot(out) == before


def test_backups_are_numbered_and_never_deleted(out, pairdir):
    """The issue's sequence: rq1 --layers 0,4; --layers 0,2 --overwrite; the same again; --layers 0,4 --overwrite."""
    pair = ["--pair", pairdir / "pair.toml", "--out", out]
    rq1 = out / "mine" / "rq1"
    first = (rq1 / "metrics.csv").read_text()
    r = _invoke(["rq1", *pair, *RQ1, "--layers", "0,2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert f"kept the earlier results of {rq1} as {rq1}.prev-1" in r.output
    second = (rq1 / "metrics.csv").read_text()
    assert (out / "mine" / "rq1.prev-1" / "metrics.csv").read_text() == first and second != first
    r = _invoke(["rq1", *pair, *RQ1, "--layers", "0,2"])  # the same command: identical results, nothing moved
    assert r.exit_code == 0, r.output
    assert "kept the earlier" not in r.output and not (out / "mine" / "rq1.prev-2").exists()
    assert (out / "mine" / "rq1.prev-1" / "metrics.csv").read_text() == first
    r = _invoke(["rq1", *pair, *RQ1, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "mine" / "rq1.prev-1" / "metrics.csv").read_text() == first
    assert (out / "mine" / "rq1.prev-2" / "metrics.csv").read_text() == second
    assert (rq1 / "metrics.csv").read_text() == first  # deterministic: the first run again


def test_a_model_changed_in_place_is_never_read_from_a_stale_store(toys, tmp_path):
    from safetensors.torch import load_file, save_file

    toml = _copy_pair(toys, tmp_path / "pair")
    out = tmp_path / "out"
    args = ["rq1", "--pair", toml, "--out", out, *RQ1]
    assert _invoke(args).exit_code == 0
    first = (out / "mine" / "rq1" / "metrics.csv").read_text()
    before = _snapshot(out)
    w = tmp_path / "pair" / "tuned" / "model.safetensors"
    sd = load_file(str(w))
    key = next(k for k in sd if "layers.2" in k and "down_proj" in k)
    sd[key] = sd[key] * 3
    save_file(sd, str(w), metadata={"format": "pt"})
    r = _invoke(args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "holds activations of other weights of the tuned model" in lines[0] and "model.safetensors" in lines[0]
    assert "--overwrite" in lines[0]
    assert {k: v for k, v in _snapshot(out).items() if k in before} == before
    r = _invoke([*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "mine" / "rq1.prev-1" / "metrics.csv").read_text() == first
    assert (out / "mine" / "rq1" / "metrics.csv").read_text() != first  # measured on the new weights


@pytest.mark.parametrize("max_tokens", [None, 12])
def test_too_long_prompts_dropped_and_counted(pairdir, max_tokens):
    import dataclasses

    from mdiff import activations as A
    from mdiff import data, models
    from mdiff.pairs import load_pair_file
    from mdiff.positions import parse_positions

    _with_long_prompt(pairdir)
    extra = {"max_tokens": max_tokens} if max_tokens else {}
    spec = load_pair_file(_toml(pairdir / "drop.toml", prompts="long.jsonl", too_long="drop", **extra))
    assert spec.too_long == "drop" and spec.max_tokens == max_tokens
    info = models.inspect_pair(spec)
    prompts = data.load_prompts(spec.prompts)[:20]
    lengths = [len(x) for x in data.tokenize(prompts, models.load_tokenizer(spec.base), True)]  # the reference
    limit = min(128, max_tokens or 128)
    expect = [p.id for p, n in zip(prompts, lengths, strict=True) if n <= limit]
    assert 0 < len(expect) < 20
    prep = A.prepare_pair_prompts(spec, info, parse_positions("last"), None, 0, 20)[0]
    assert prep.prompt_ids == expect and prep.summary()["dropped_too_long"] == 20 - len(expect)
    with pytest.raises(Exception, match=f"{20 - len(expect)} of 20 prompts are longer than"):
        A.prepare_pair_prompts(dataclasses.replace(spec, too_long="error"), info, parse_positions("last"), None, 0, 20)


def _held_before_commit(tmp_path: Path) -> dict:
    """The environment of a child ``mdiff`` that pauses 120 s before it commits RQ1 (a sitecustomize of the tests'
    own), so that a signal always finds the run at work with its temporary folder, however fast the machine."""
    import os

    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(
        "import time\nfrom mdiff import io\n_commit = io.ResultWriter.commit\n\n"
        "def commit(self):\n    if self.path.name == 'rq1':\n        time.sleep(120)\n    return _commit(self)\n\n"
        "io.ResultWriter.commit = commit\n")
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(hold), root]), "OMP_NUM_THREADS": "1"}


def test_killed_runs_leave_nothing_behind(out, pairdir, tmp_path):
    """SIGKILL leaves a temporary folder, which the next run removes; SIGTERM unwinds with one line (exit 130)."""
    import signal
    import subprocess
    import sys
    import time

    from mdiff.tmpfiles import host_tag

    env = _held_before_commit(tmp_path)
    cmd = [sys.executable, "-m", "mdiff.cli", "rq1", "--pair", str(pairdir / "pair.toml"), "--out", str(out), *RQ1,
           "--bootstrap", "12", "--overwrite"]
    before = _snapshot(out)

    def start_and_wait():
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tmp = out / "mine" / f".rq1.tmp-{host_tag()}-{p.pid}"
        t0 = time.time()
        while not tmp.exists():
            assert p.poll() is None, p.communicate()
            assert time.time() - t0 < 60
            time.sleep(0.05)
        return p, tmp

    p, killed_tmp = start_and_wait()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert killed_tmp.exists()  # what a SIGKILL leaves
    p, tmp = start_and_wait()
    assert not killed_tmp.exists()  # removed by the next run
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["interrupted; rerun the same command to resume"]
    assert not tmp.exists() and not [q for q in (out / "mine").iterdir() if ".tmp-" in q.name]
    assert {k: v for k, v in _snapshot(out).items() if k in before} == before
    assert not (out / "mine" / "rq1.prev-1").exists()


def test_sigterm_at_any_moment_gives_status_130_and_one_line(out, pairdir, tmp_path):
    """SIGTERM at several moments of a run (imports, model load, compute): always status 130 and the one line,
    never a traceback. A signal that lands inside an import used to surface as `ImportError: initialization
    failed` (status 1) or leave CPython's unhandled-interrupt mark set (status -2, killed by SIGINT at exit).
    Only a signal before mdiff's handler is installed (interpreter start-up) may end the default way (-15)."""
    import signal
    import subprocess
    import sys
    import time

    env = _held_before_commit(tmp_path)  # the run never finishes before the signal
    cmd = [sys.executable, "-m", "mdiff.cli", "rq1", "--pair", str(pairdir / "pair.toml"), "--out",
           str(tmp_path / "o"), *RQ1]
    codes = []
    for delay in (0.3, 0.6, 0.9, 1.3, 2.0, 3.0, 4.5):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        codes.append(p.returncode)
        assert p.returncode in (130, -signal.SIGTERM), (delay, p.returncode, err)
        assert "Traceback" not in err and "Error" not in err, (delay, err)
        if p.returncode == 130:
            assert [ln for ln in err.splitlines() if ln.strip()] == ["interrupted; rerun the same command to resume"]
    assert codes.count(130) >= 4, codes
    left = [q for q in (tmp_path / "o").rglob("*") if ".tmp-" in q.name] if (tmp_path / "o").exists() else []
    assert not left


def test_changing_n_needs_only_overwrite(out, pairdir):
    """Other prompts for the same store: refused in one line, then --overwrite collects the store anew."""
    args = ["rq1", "--pair", pairdir / "pair.toml", "--out", out, *RQ1, "--n", "6"]
    r = _invoke(args)
    assert r.exit_code == 2 and "other settings (differs in: n)" in r.output
    r = _invoke([*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "mine" / "rq1" / "config.json").read_text())["prompts"]["n_prompts"] == 6
    assert json.loads((out / "mine" / "rq1.prev-1" / "config.json").read_text())["prompts"]["n_prompts"] == 8
