"""The scale benchmark's meter (per-step time, peak RSS, disk, models resident) and its end-to-end run."""

import time

import pytest
from harness import harness

scale = harness("scale")


def test_step_meter_records_each_step(tmp_path):
    meter = scale.StepMeter(tmp_path, "cpu")
    meter.step("allocate", 0.0)
    big = bytearray(300 * 2 ** 20)  # touch 300 MiB: the step's peak RSS must see it
    for i in range(0, len(big), 4096):
        big[i] = 1
    (tmp_path / "f.bin").write_bytes(b"x" * 2 ** 20)
    del big  # freed before the next step starts: that step's peak must not include it
    meter.step("idle", 0.5)
    time.sleep(0.01)
    meter.close()
    a, b = meter.rows
    assert (a["step"], b["step"]) == ("allocate", "idle")
    assert a["disk_mib"] == pytest.approx(1.0) and a["seconds"] >= 0
    if meter.can_reset:  # Linux: the peak is reset between steps
        assert a["peak_rss_gib"] - b["peak_rss_gib"] > 0.2
    assert a["models_resident_max"] == 0  # none loaded during the step


def test_matmul_speed_reports_the_faster_dtype():
    r = scale.matmul_speed("cpu", m=8, k=64, n=64, repeats=1)
    assert r["faster"] in ("bfloat16", "float32") and r[r["faster"]] <= max(r["bfloat16"], r["float32"])


@pytest.mark.slow
def test_scale_run_on_the_small_fixture(tmp_path):
    pytest.importorskip("llama_models")
    res = scale.run_scale("llama31-fixture-small", n=8, out=tmp_path, device="cpu", bootstrap=20)
    steps = [r["step"] for r in res["steps"]]
    assert any("collecting base" in s for s in steps) and any("behaviour" in s for s in steps)
    assert res["models_resident_max"] == 1 and res["meets"]["one_model_resident"]
    assert res["rq1_error"] is None and res["d_vocab"] == [128_256, 159_766]
    md = scale.write_scale(res, tmp_path / "bench")
    assert md.is_file() and "| step |" in md.read_text() and md.with_suffix(".json").is_file()
