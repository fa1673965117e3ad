"""Pair names and pair TOML files: every key checked, errors name the file and the key."""

import json

import pytest
from typer.testing import CliRunner

from mdiff.cli import app
from mdiff.errors import MdiffError
from mdiff.pairs import BUILTIN, load_pair_file, resolve_pair

runner = CliRunner()


def write(tmp_path, text, name="pair.toml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_builtin_pairs_are_the_study_pairs():
    assert BUILTIN["cultural"].base == "meta-llama/Llama-3.1-8B-Instruct"
    assert BUILTIN["cultural"].tuned == "inceptionai/Llama-3.1-Sherkala-8B-Chat"
    assert BUILTIN["cognitive"].base == "meta-llama/Llama-3.1-8B"
    assert BUILTIN["cognitive"].tuned == "nvidia/OpenMath2-Llama3.1-8B"
    # Sherkala's template comes from its model card, carried as a string
    assert isinstance(BUILTIN["cultural"].chat_template, str)
    assert "<|start_header_id|>" in BUILTIN["cultural"].chat_template
    assert BUILTIN["cognitive"].chat_template is True


def test_sherkala_template_renders_llama31_format():
    from jinja2 import Template

    s = Template(BUILTIN["cultural"].chat_template).render(
        messages=[{"role": "user", "content": " Сәлем "}], bos_token="<|begin_of_text|>", add_generation_prompt=True)
    assert s == (" <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nСәлем<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_full_toml(tmp_path):
    (tmp_path / "m").mkdir()
    p = write(tmp_path, """
name = "mine"
base = "./m"
tuned = "org/model"
revision = {base = "abc", tuned = "def"}
dtype = "bfloat16"
prompts = "p.jsonl"
chat_template = "{{ bos_token }}{{ messages[0]['content'] }}"
min_shared_ratio = 0.65
""")
    s = load_pair_file(p)
    assert s.name == "mine"
    assert s.base == str((tmp_path / "m").resolve())
    assert s.tuned == "org/model"  # hub id left alone
    assert (s.base_revision, s.tuned_revision) == ("abc", "def")
    assert s.dtype == "bfloat16"
    assert s.prompts == str((tmp_path / "p.jsonl").resolve())
    assert s.chat_template.startswith("{{ bos_token }}")
    assert s.min_shared_ratio == 0.65
    assert resolve_pair(str(p)) == s


def test_minimal_toml_defaults(tmp_path):
    s = load_pair_file(write(tmp_path, 'base = "a/b"\ntuned = "c/d"\nrevision = "v1"\n', "x.toml"))
    assert s.name == "x" and s.dtype == "float32" and s.chat_template is False
    assert s.base_revision == s.tuned_revision == "v1"


@pytest.mark.parametrize("text, needle", [
    ('base = "a/b"\n', "missing required key 'tuned'"),
    ('base = "a/b"\ntuned = "c/d"\ndtyp = "float32"\n', "unknown key 'dtyp'"),
    ('base = "a/b"\ntuned = "c/d"\ndtype = "float8"\n', "key 'dtype'"),
    ('base = "a/b"\ntuned = 3\n', "key 'tuned' must be a non-empty string"),
    ('base = "a/b"\ntuned = "c/d"\nchat_template = 1\n', "key 'chat_template'"),
    ('base = "a/b"\ntuned = "c/d"\nrevision = 5\n', "key 'revision'"),
    ('base = "a/b"\ntuned = "c/d"\nrevision = {base = "x", other = "y"}\n', "unknown entry 'other'"),
    ('base = "a/b"\ntuned = "c/d"\nmin_shared_ratio = 2\n', "key 'min_shared_ratio'"),
    ('base = "a/b"\ntuned = "c/d"\nmax_tokens = 0\n', "key 'max_tokens' must be a whole number ≥ 1"),
    ('base = "a/b"\ntuned = "c/d"\nmax_tokens = "512"\n', "key 'max_tokens'"),
    ('base = "a/b"\ntuned = "c/d"\ntoo_long = "truncate"\n', "key 'too_long' must be one of error, drop"),
    ('base = "a/b"\ntuned = "c/d"\nbase = "e/f"\n', "malformed TOML"),
    ('base = "a/b\ntuned = "c/d"\n', "malformed TOML"),
])
def test_bad_toml_names_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(MdiffError) as e:
        load_pair_file(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", ".", ".hidden", "x..y", "a\\b", "sp ace",
                                  "compare", "x" * 101, ""])
def test_pair_names_must_be_plain_folder_names(tmp_path, name):
    p = write(tmp_path, f'name = {json.dumps(name)}\nbase = "a/b"\ntuned = "c/d"\n')
    with pytest.raises(MdiffError) as e:
        load_pair_file(p)
    msg = str(e.value)
    assert str(p) in msg and "key 'name'" in msg and "\n" not in msg


def test_pair_name_from_the_file_name_is_checked_too(tmp_path):
    with pytest.raises(MdiffError, match="the file name .*must be a plain folder name"):
        load_pair_file(write(tmp_path, 'base = "a/b"\ntuned = "c/d"\n', name="my pair.toml"))
    for ok in ("toy-lowrank", "Llama_3.1-8B", "a"):
        assert load_pair_file(write(tmp_path, f'name = "{ok}"\nbase = "a/b"\ntuned = "c/d"\n')).name == ok


def test_pairspec_refuses_unsafe_names_however_built():
    import dataclasses

    with pytest.raises(MdiffError, match="plain folder name"):
        dataclasses.replace(BUILTIN["cultural"], name="../escape")


def test_malformed_toml_reports_line(tmp_path):
    p = write(tmp_path, 'base = "a/b"\ntuned = "c/d"\ndtype = \n')
    with pytest.raises(MdiffError, match=r"line 3"):
        load_pair_file(p)


def test_unknown_pair_name():
    with pytest.raises(MdiffError, match="unknown pair 'nope'.*cultural.*toy-lowrank"):
        resolve_pair("nope")


def test_missing_pair_file(tmp_path):
    with pytest.raises(MdiffError, match="pair file not found"):
        resolve_pair(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("args, needle", [
    (["info", "--pair", "nope"], "unknown pair 'nope'"),
    (["info", "--pair", "missing.toml"], "pair file not found"),
])
def test_cli_errors_are_one_line_without_traceback(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert needle in r.output
    assert "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1


def test_cli_malformed_toml(tmp_path):
    p = write(tmp_path, 'base = "a/b"\ntuned = [1,\n')
    r = runner.invoke(app, ["info", "--pair", str(p)])
    assert r.exit_code == 2 and "malformed TOML" in r.output and "Traceback" not in r.output


def test_pairs_json_lists_all_with_truth():
    r = runner.invoke(app, ["pairs", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert set(rows) >= {"cultural", "cognitive", "toy-lowrank", "toy-distributed"}
    for row in rows.values():
        assert row["base"] and row["tuned"]
    assert rows["toy-lowrank"]["truth"] == {**rows["toy-lowrank"]["truth"], "layer": 4, "heads": [1, 2], "rank": 2}
    assert rows["toy-distributed"]["truth"]["task"] == "addition"
    assert "truth" not in rows["cultural"]


def test_pairs_table():
    r = runner.invoke(app, ["pairs"])
    assert r.exit_code == 0 and "toy-lowrank" in r.output and "cognitive" in r.output
