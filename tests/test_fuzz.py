"""Fault campaign, short form (the full one: benchmarks/fuzz.py): damaged GGUFs, generated request bodies,
and native entry points called with arguments out of range. Nothing may crash, hang or answer 5xx."""

import json
import random
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from test_server import start_server

from pymorph_edge.bench.gguf_fuzz import campaign
from pymorph_edge.bench.request_fuzz import post_body, request_bodies


def test_damaged_ggufs_load_or_give_a_value_error(gqa_model, tmp_path):
    result = campaign(Path(gqa_model), 60, tmp_path, seed=7, timeout_s=60)
    bad = {k: v for k, v in result["outcomes"].items() if v not in ("loaded", "value_error")}
    assert not bad, bad
    assert result["counts"].get("value_error", 0) > 20  # the corruptions do reach the checks


def test_a_duplicate_token_is_refused_before_llama_cpp_aborts(gqa_model, tmp_path):
    # found by the campaign: llama.cpp asserts (abort) on a vocabulary with two identical token strings
    import gguf

    from pymorph_edge import Llama

    data = bytearray(Path(gqa_model).read_bytes())
    r = gguf.GGUFReader(gqa_model)
    f = r.fields["tokenizer.ggml.tokens"]
    a, b = (bytes(f.parts[i]) for i in f.data[100:102])
    assert len(a) == len(b)  # byte-fallback vocab: same length, so the file stays well-formed
    i = data.index(b, data.index(a))
    data[i : i + len(b)] = a
    bad = tmp_path / "dup.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="appears twice"):
        Llama(str(bad), kv_budget=None)


def test_generated_requests_get_2xx_or_4xx_never_5xx(gqa_model):
    proc, port = start_server(gqa_model, "--max-tokens-limit", "8")
    try:
        statuses = {}
        for i, (path, body) in enumerate(request_bodies(random.Random(11), 160)):
            code = post_body(port, path, body, timeout=60)
            statuses.setdefault(code, []).append(i)
            assert code < 500, (code, path, body[:300])
        assert statuses.get(200) and len(statuses) > 1  # both valid and invalid bodies were generated
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert json.loads(r.read())["busy"] == 0
    finally:
        proc.terminate()
        proc.wait(10)


NATIVE_ABUSE = textwrap.dedent(
    """
    from pymorph_edge._native import native
    ffi, lib = native()
    NULL = ffi.NULL
    i32 = ffi.new("int32_t[8]")
    f32 = ffi.new("float[8]")
    buf = ffi.new("char[64]")
    stats = ffi.new("pme_stats *")
    err = ffi.new("char[256]")
    # NULL state everywhere
    assert lib.pme_begin_ubatch(NULL, i32, 1, 0) == -1
    assert lib.pme_end_ubatch(NULL) == -1
    assert lib.pme_evict(NULL, NULL, 0, 0) == -1
    assert lib.pme_truncate(NULL, NULL, 0, 0) == -1
    assert lib.pme_compact(NULL, NULL, 0, 0) == -1
    assert lib.pme_min_live_tail(NULL, 5) == -1
    assert lib.pme_cell_positions(NULL, i32, 8) == -1
    assert lib.pme_set_head_weights(NULL, f32, 8) == -1
    assert lib.pme_calibrate(NULL, i32, 1) == -1
    assert lib.pme_calibration_scores(NULL, f32, 8) == -1
    assert lib.pme_session_size(NULL) == -1
    assert lib.pme_session_save(NULL, buf, 64) == -1
    assert lib.pme_session_load(NULL, buf, 64) == -1
    assert lib.pme_test_set_cells(NULL, i32, 8) == -1
    assert lib.pme_test_observe(NULL, f32, 8, 1, 1) == -1
    assert lib.pme_test_select(NULL, 0, i32, 8) == -1
    assert lib.pme_test_scores(NULL, f32, 8) == -1
    lib.pme_get_stats(NULL, stats)
    lib.pme_reset(NULL)
    lib.pme_free(NULL)
    assert ffi.string(lib.pme_last_error(NULL)) == b""
    # bad configurations
    assert lib.pme_create(NULL, err, 256) == NULL
    cfg = ffi.new("pme_config *")
    assert lib.pme_create(cfg, err, 256) == NULL and b"invalid config" in ffi.string(err)
    cfg.n_cells, cfg.budget, cfg.window, cfg.n_head, cfg.n_head_kv, cfg.n_layer, cfg.max_ubatch = 16, 8, 4, 3, 2, 2, 8
    assert lib.pme_create(cfg, NULL, 0) == NULL  # n_head not a multiple of n_head_kv; no error buffer
    cfg.n_head = 4
    st = lib.pme_create(cfg, err, 256)
    assert st != NULL
    # a real state, bad arguments
    for call in (
        lambda: lib.pme_begin_ubatch(st, NULL, 1, 0),
        lambda: lib.pme_begin_ubatch(st, i32, 0, 0),
        lambda: lib.pme_begin_ubatch(st, i32, 9, 0),
        lambda: lib.pme_begin_ubatch(st, i32, -5, 0),
        lambda: lib.pme_end_ubatch(st),
        lambda: lib.pme_evict(st, NULL, 0, 0),
        lambda: lib.pme_truncate(st, NULL, 0, 0),
        lambda: lib.pme_compact(st, NULL, 0, 0),
        lambda: lib.pme_cell_positions(st, NULL, 8),
        lambda: lib.pme_cell_positions(st, i32, -1),
        lambda: lib.pme_set_head_weights(st, f32, 3),
        lambda: lib.pme_set_head_weights(st, f32, -1),
        lambda: lib.pme_calibrate(st, NULL, 1),
        lambda: lib.pme_calibrate(st, i32, 0),
        lambda: lib.pme_calibrate(st, i32, 1 << 30),
        lambda: lib.pme_calibration_scores(st, NULL, 8),
        lambda: lib.pme_calibration_scores(st, f32, -3),
        lambda: lib.pme_session_save(st, NULL, 64),
        lambda: lib.pme_session_save(st, buf, 2),
        lambda: lib.pme_session_load(st, NULL, 64),
        lambda: lib.pme_session_load(st, buf, -1),
        lambda: lib.pme_session_load(st, buf, 64),
        lambda: lib.pme_test_set_cells(st, i32, 1 << 30),
        lambda: lib.pme_test_set_cells(st, i32, -2),
        lambda: lib.pme_test_set_cells(st, NULL, 4),
        lambda: lib.pme_test_observe(st, f32, 8, 1, 4),
        lambda: lib.pme_test_observe(st, NULL, 8, 1, 4),
        lambda: lib.pme_test_select(st, 0, NULL, 8),
        lambda: lib.pme_test_scores(st, NULL, 8),
    ):
        assert call() == -1
        lib.pme_reset(st)  # errors are sticky until a reset, as after a failed decode
    assert lib.pme_min_live_tail(st, -1) == -1
    lib.pme_get_stats(st, NULL)
    lib.pme_free(st)
    print("survived")
    """
)


def test_native_entry_points_refuse_bad_arguments_without_crashing():
    r = subprocess.run([sys.executable, "-c", NATIVE_ABUSE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])
