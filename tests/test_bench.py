"""The benchmark harness's smoke configuration (the one CI runs) on the synthetic model."""

import json
from pathlib import Path

import pytest

from pymorph_edge.bench.config import BenchConfig
from pymorph_edge.bench.report import headline
from pymorph_edge.bench.runner import run

SMOKE = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "smoke.json"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = run(BenchConfig.load(SMOKE), out, "pytest smoke")
    return res, out


def test_outputs_are_written(results):
    res, out = results
    for name in ("results.json", "results.md", "bench.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["tasks"].keys() == res["tasks"].keys()
    assert "| morphkv |" in (out / "results.md").read_text()


def test_longrun_reports_every_segment(results):
    res, out = results
    rows = {r["policy"]: r for r in res["tasks"]["longrun"]}
    assert set(rows) == {"full", "morphkv", "morphkv-max", "h2o", "tova", "snapkv", "streaming", "context_shift"}
    for r in rows.values():
        assert [s["end"] - s["start"] for s in r["segments"]] == [128] * 4 and all(s["ppl"] > 1 for s in r["segments"])
    assert rows["context_shift"]["max_next_pos"] <= 128  # it never spans more than its budget
    assert (out / "longrun.png").stat().st_size > 0 and "## Long run" in (out / "results.md").read_text()


def test_every_policy_has_every_figure(results):
    res, _ = results
    rows = {r["policy"]: r for r in headline(res)}
    assert set(rows) == {"full", "morphkv", "morphkv-max", "h2o", "tova", "snapkv", "streaming", "context_shift"}
    for r in rows.values():
        assert 0.0 <= r["passkey"] <= 1.0 and r["ppl"] > 0 and 0.0 <= r["top1"] <= 1.0 and r["decode_tok_s"] > 0


def test_figures_behave_as_the_policies_should(results):
    res, _ = results
    rows = {r["policy"]: r for r in headline(res)}
    assert rows["full"]["top1"] == 1.0 and abs(rows["full"]["kl"]) < 1e-6 and rows["full"]["ppl_ratio"] == 1.0
    budget, ubatch = res["config"]["budget"], res["config"]["n_ubatch"]
    for name in ("morphkv", "morphkv-max", "h2o", "tova", "streaming"):
        assert rows[name]["peak_cells"] <= budget + ubatch
        assert rows[name]["top1"] < 1.0  # evicting changes the model's predictions on this random model
    assert rows["snapkv"]["peak_cells"] > budget + ubatch  # it lets the cache grow during generation
    mem = {r["policy"]: r["lengths"] for r in res["tasks"]["memory"]}
    assert mem["full"][-1]["kv_bytes"] > mem["full"][0]["kv_bytes"]  # full cache grows with the output
    assert mem["morphkv"][-1]["kv_bytes"] == mem["morphkv"][0]["kv_bytes"]  # bounded cache does not


def test_bad_config_is_a_clear_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"budget": 0}')
    with pytest.raises(ValueError, match="budget must be a positive int"):
        BenchConfig.load(p)
    p.write_text('{"bugdet": 5}')
    with pytest.raises(ValueError, match="unknown keys"):
        BenchConfig.load(p)
    p.write_text('{"tasks": ["speedy"]}')
    with pytest.raises(ValueError, match="unknown tasks"):
        BenchConfig.load(p)
