"""Dataset prompt sources of the real pairs: materialising from a local copy in the hub schema, provenance,
the offline error, the pair-file table, and the ``--prompts FILE`` override."""

import json

import pytest
from typer.testing import CliRunner

from mdiff import data
from mdiff.cli import app
from mdiff.errors import MdiffError
from mdiff.pairs import BUILTIN, load_pair_file, with_prompts

# A tiny copy of kz-transformers/kk-socio-cultural-bench-mc in its schema (split "train"; columns question,
# A..D, answer as a letter, category), as `hf download` lays it out (data/train-*.parquet).
KK_ROWS = [
    {"question": "Наурыз қашан тойланады?", "A": "22 наурыз", "B": "1 мамыр", "C": "16 желтоқсан", "D": "1 қаңтар",
     "answer": "A", "category": "tradition"},
    {"question": "Қонақ келгенде не істейді?", "A": "шай береді", "B": "кетеді", "C": "ұйықтайды", "D": "жылайды",
     "answer": "A", "category": "Etiquette"},
    {"question": "Ораза айы қалай аталады?", "A": "Рамазан", "B": "Наурыз", "C": "Шілде", "D": "Тамыз",
     "answer": "A", "category": "religion"},
    {"question": "Абай кім?", "A": "ақын", "B": "спортшы", "C": "әнші", "D": "дәрігер", "answer": "A",
     "category": "history"},
    {"question": "Асар дегеніміз не?", "A": "ауыл көмегі", "B": "ас", "C": "ән", "D": "ойын", "answer": "A",
     "category": "community"},
    {"question": "Домбыра неше ішекті?", "A": "үш", "B": "екі", "C": "бес", "D": "төрт", "answer": "B",
     "category": "culture"},
    {"question": "Наурыз қашан тойланады?", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "C",
     "category": "culture"},  # the same question again: dropped as a duplicate
    {"question": "   ", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "C", "category": "culture"},
]
# MATH-500's schema (split "test"; problem, solution, answer, subject, level, unique_id), test.jsonl at the root.
MATH_ROWS = [
    {"problem": "What is $1+1$?", "solution": "2", "answer": "2", "subject": "Prealgebra", "level": 1,
     "unique_id": "test/prealgebra/1.json"},
    {"problem": "Solve $x^2=4$ for $x>0$.", "solution": "x=2", "answer": "2", "subject": "Algebra", "level": 2,
     "unique_id": "test/algebra/7.json"},
    {"problem": "How many primes are below 10?", "solution": "4", "answer": "4", "subject": "Number Theory",
     "level": 1, "unique_id": "test/number_theory/3.json"},
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MDIFF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def kk_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "kk-copy"
    (d / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(KK_ROWS), d / "data" / "train-00000-of-00001.parquet")
    return d


@pytest.fixture
def math_dir(tmp_path):
    d = tmp_path / "math-copy"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS), encoding="utf-8")
    return d


def _src(name):
    return data.source_from_dict(BUILTIN[name].prompt_source)


def test_cultural_source_keeps_the_seed_categories_with_provenance(cache, kk_dir):
    path, prov = data.materialise_source("cultural", _src("cultural"), kk_dir)
    rows = data.load_prompts(path)
    # culture / tradition / etiquette (any case) / community kept; religion excluded; history not selected;
    # the repeated question and the blank one dropped, each with its reason
    assert [r.prompt for r in rows] == [KK_ROWS[i]["question"] for i in (0, 1, 4, 5)]
    assert [r.id for r in rows] == ["kk-socio-00000", "kk-socio-00001", "kk-socio-00004", "kk-socio-00005"]
    assert rows[0].choices == ("22 наурыз", "1 мамыр", "16 желтоқсан", "1 қаңтар")
    assert rows[0].answer == "22 наурыз" and rows[3].answer == "екі"  # the letter mapped to its choice
    assert prov["rows_read"] == 8 and prov["kept"] == 4
    assert prov["dropped"] == {"category religion excluded": 1, "category not selected": 1,
                               "duplicate prompt text": 1, "empty prompt": 1}
    assert sum(prov["dropped"].values()) + prov["kept"] == prov["rows_read"]
    assert prov["categories_kept"] == {"Etiquette": 1, "community": 1, "culture": 1, "tradition": 1}
    assert prov["source"]["dataset"] == "kz-transformers/kk-socio-cultural-bench-mc"
    assert prov["origin"]["fingerprint"].startswith("sha256:")
    on_disk = json.loads(path.with_name(path.name + ".provenance.json").read_text())
    assert on_disk["kept"] == 4 and on_disk["file"] == str(path)
    assert path.parent == cache / "prompts"


def test_cognitive_source_reads_math500_problems(cache, math_dir):
    path, prov = data.materialise_source("cognitive", _src("cognitive"), math_dir)
    rows = data.load_prompts(path)
    assert [r.prompt for r in rows] == [r["problem"] for r in MATH_ROWS]
    assert [r.id for r in rows] == [r["unique_id"] for r in MATH_ROWS]
    assert [r.category for r in rows] == ["Prealgebra", "Algebra", "Number Theory"]
    assert prov["kept"] == 3 and prov["dropped"] == {}


def test_materialised_set_is_reused_and_never_overwritten_by_other_data(cache, kk_dir, tmp_path):
    path, _ = data.materialise_source("cultural", _src("cultural"), kk_dir)
    before = path.read_bytes()
    again, prov = data.materialise_source("cultural", _src("cultural"))  # no hub needed once cached
    assert again == path and prov["kept"] == 4 and path.read_bytes() == before
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(KK_ROWS[:2]), other / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(MdiffError, match="materialised from other data"):
        data.materialise_source("cultural", _src("cultural"), other)
    assert path.read_bytes() == before


def test_offline_error_names_the_dataset_and_the_local_copy(cache):
    with pytest.raises(MdiffError) as e:
        data.materialise_source("cognitive", _src("cognitive"))
    msg = str(e.value)
    assert "\n" not in msg and "HuggingFaceH4/MATH-500" in msg and msg.endswith("give that folder DIR as dataset_dir")
    assert e.value.option == "dataset_dir"


def test_wrong_schema_names_the_missing_column(cache, math_dir):
    with pytest.raises(MdiffError, match="no column 'question'.*columns: answer, level, problem"):
        data.materialise_source("cultural-on-math", _src("cultural").__class__(
            dataset="x/y", split="test", prompt_field="question"), math_dir)


def test_pair_file_names_a_dataset_source(tmp_path, cache, math_dir):
    f = tmp_path / "pair.toml"
    f.write_text('base = "./b"\ntuned = "./t"\n[prompts]\ndataset = "HuggingFaceH4/MATH-500"\nsplit = "test"\n'
                 'revision = "abc123"\nfields = {prompt = "problem", id = "unique_id"}\n', encoding="utf-8")
    spec = load_pair_file(f)
    assert spec.prompts is None and spec.prompt_source["dataset"] == "HuggingFaceH4/MATH-500"
    src = data.source_from_dict(spec.prompt_source)
    assert (src.split, src.revision, src.prompt_field, src.id_field) == ("test", "abc123", "problem", "unique_id")
    data.materialise_source(spec.name, src, math_dir)
    assert [p.id for p in data.pair_prompts(spec)] == [r["unique_id"] for r in MATH_ROWS]


@pytest.mark.parametrize("table, needle", [
    ('[prompts]\nsplit = "test"\n', "'dataset'"),
    ('[prompts]\ndataset = "a/b"\nfoo = 1\n', "unknown key 'foo'"),
    ('[prompts]\ndataset = "a/b"\nfields = {text = "q"}\n', "unknown entry 'text'"),
    ('[prompts]\ndataset = "a/b"\ncategories = "culture"\n', "'categories' must be a list"),
])
def test_bad_source_tables(tmp_path, table, needle):
    f = tmp_path / "pair.toml"
    f.write_text('base = "./b"\ntuned = "./t"\n' + table, encoding="utf-8")
    with pytest.raises(MdiffError, match=needle):
        load_pair_file(f)


def test_prompts_override_and_missing_file(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"id": "a", "prompt": "hi"}\n', encoding="utf-8")
    spec = with_prompts(BUILTIN["cultural"], str(p))
    assert spec.prompts == str(p.resolve()) and spec.prompt_source is None
    assert [x.id for x in data.pair_prompts(spec)] == ["a"]
    with pytest.raises(MdiffError, match="^prompts_file .*no such file"):
        with_prompts(BUILTIN["cultural"], str(tmp_path / "nope.jsonl"))


def test_cli_prompts_summary_and_offline_error(cache, kk_dir):
    r = CliRunner().invoke(app, ["prompts", "--pair", "cultural", "--dataset-dir", str(kk_dir)])
    assert r.exit_code == 0, r.output
    assert "kept 4" in r.output and "category religion excluded" in r.output and "min_shared_ratio=0.65" in r.output
    r = CliRunner().invoke(app, ["prompts", "--pair", "cognitive"])
    assert r.exit_code == 2 and "HuggingFaceH4/MATH-500" in r.output and "Traceback" not in r.output


def test_every_rq_command_takes_prompts_file():
    for cmd in ("collect", "rq1", "rq2", "rq3", "rq4", "study"):
        r = CliRunner().invoke(app, [cmd, "--help"], terminal_width=200)
        assert "--prompts" in r.output, cmd


@pytest.mark.slow
def test_cli_prompts_file_overrides_the_pairs_set(toys, tmp_path):
    rows = [{"id": f"mine-{i}", "prompt": f"the capital of {c} is"} for i, c in enumerate(["france", "peru", "chile"])]
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    r = CliRunner().invoke(app, ["collect", "--pair", "toy-lowrank", "--prompts", str(f), "--layers", "0",
                                 "--split", "all", "--side", "base", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    (mf,) = (tmp_path / "o" / "toy-lowrank" / "activations").glob("base-*/manifest.json")
    assert json.loads(mf.read_text())["settings"]["prompt_ids"] == ["mine-0", "mine-1", "mine-2"]
    r = CliRunner().invoke(app, ["rq1", "--pair", "toy-lowrank", "--prompts", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "no such file" in r.output
