"""Pins down the llama.cpp behaviour the engine relies on (the team keeps the measured facts in LLAMA_CPP_FACTS.md).

If the pinned llama-cpp-python changes, these are the tests that say which assumption broke.
A slow Python eval callback is fine here: it only inspects a few decodes of a tiny model.
"""

import ctypes
import importlib.metadata
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as C
import pytest

from pymorph_edge.model.model_file import LoadedModel


def test_pinned_version_and_installed_files():
    assert importlib.metadata.version("llama-cpp-python") == "0.3.36"
    pkg = Path(llama_cpp.__file__).parent
    for lib in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        assert (pkg / "lib" / lib).exists(), lib
    for h in ("llama.h", "ggml.h", "ggml-backend.h", "ggml-cpu.h"):
        assert (pkg.parent / "include" / h).exists(), h


def test_context_defaults():
    p = C.llama_context_default_params()
    assert (p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max) == (512, 2048, 512, 1)
    assert p.flash_attn_type == -1 and p.swa_full is True


class Tensor(ctypes.Structure):
    pass


Tensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(Tensor) * 10),
    ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


class GraphSpy:
    """Records what the scheduler shows an eval callback during a decode."""

    def __init__(self):
        self.asked = 0
        self.softmax = {}  # layer -> (ne, min over evicted cells)
        self.k_idxs = []  # (layer, name of src[1], type, values)
        self.evicted_cells: list[int] = []
        self.cb = C.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t, ask, _ud):
        tt = ctypes.cast(t, ctypes.POINTER(Tensor)).contents
        name = tt.name.decode()
        if ask:
            self.asked += 1
            if name.startswith("cache_k_l") and tt.src[1]:
                s1 = tt.src[1].contents
                vals = list(ctypes.cast(s1.data, ctypes.POINTER(ctypes.c_int64))[: s1.ne[0]])
                self.k_idxs.append((name, s1.name.decode(), s1.type, vals, tuple(tt.ne)))
            return name.startswith("kq_soft_max-")
        ne = tuple(tt.ne)
        vals = ctypes.cast(tt.data, ctypes.POINTER(ctypes.c_float))
        evicted = [vals[c] for c in self.evicted_cells]  # first token row, first head
        self.softmax[int(name.split("-")[1])] = (ne, evicted)
        return True


def _context(model, spy, flash):
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 256, 64, 64
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval = spy.cb
    return C.llama_init_from_model(model.ptr, cp)


def _decode(ctx, tokens, pos0, seq=0):
    b = C.llama_batch_init(len(tokens), 0, 1)
    for i, t in enumerate(tokens):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos0 + i, 1, 1 if i == len(tokens) - 1 else 0
        b.seq_id[i][0] = seq
    b.n_tokens = len(tokens)
    rc = C.llama_decode(ctx, b)
    C.llama_batch_free(b)
    return rc


def test_softmax_nodes_index_maps_and_eviction(gqa_model):
    model = LoadedModel(gqa_model)
    spy = GraphSpy()
    ctx = _context(model, spy, flash=False)
    mem = C.llama_get_memory(ctx)
    assert _decode(ctx, list(range(3, 43)), 0) == 0  # 40 tokens into cells 0..39
    # k_idxs: one I64 "attn_inp_k_idxs" per layer, holding each token's destination cell in ubatch order
    assert [k[0] for k in spy.k_idxs] == ["cache_k_l0 (view)", "cache_k_l1 (view)"]
    assert all(k[1] == "attn_inp_k_idxs" and k[2] == 27 for k in spy.k_idxs)  # 27 = GGML_TYPE_I64
    assert spy.k_idxs[0][3] == list(range(40))
    assert spy.k_idxs[0][4][1] == 256  # the SET_ROWS node is a view of the whole cache: ne[1] = cells
    # softmax: ne = [n_kv padded to 256, n_tokens, n_head, 1]
    assert spy.softmax[0][0] == (256, 40, 8, 1)
    # evict positions [10, 20); the next token fills a hole, and the other evicted cells show exactly 0
    assert C.llama_memory_seq_rm(mem, 0, 10, 20)
    spy.k_idxs.clear()
    spy.evicted_cells = list(range(10, 20))
    assert _decode(ctx, [50], 40) == 0
    assert spy.softmax[1][0] == (256, 1, 8, 1)
    (new_cell,) = spy.k_idxs[0][3]
    assert 10 <= new_cell < 20  # allocation is not append-only: it reused an evicted cell
    weights = dict(zip(spy.evicted_cells, spy.softmax[1][1], strict=False))
    assert weights.pop(new_cell) > 0
    assert set(weights.values()) == {0.0}
    C.llama_free(ctx)
    model.close()


def test_flash_attention_has_no_softmax_node(gqa_model):
    model = LoadedModel(gqa_model)
    spy = GraphSpy()
    ctx = _context(model, spy, flash=True)
    assert _decode(ctx, list(range(3, 20)), 0) == 0
    assert spy.softmax == {} and spy.asked > 0
    C.llama_free(ctx)
    model.close()


def _ggml_op_name(op: int) -> str:
    lib = next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    ggml = ctypes.CDLL(str(lib))
    ggml.ggml_op_name.restype = ctypes.c_char_p
    ggml.ggml_op_name.argtypes = [ctypes.c_int]
    return ggml.ggml_op_name(op).decode()


def test_flash_attention_node_sources(gqa_model):
    """native/pme_fattn.c relies on this: with flash attention on, each layer has one FLASH_ATTN_EXT node whose
    src[0] is Q (f32), src[1] a view of "cache_k_l<il>", src[3] the f16 mask, and op_params[0] the scale.
    That the sources still hold their data when the callback runs is tested in test_flash_attn_scoring.py."""
    model = LoadedModel(gqa_model)
    seen = {}

    def cb(t, ask, _ud):
        tt = ctypes.cast(t, ctypes.POINTER(Tensor)).contents
        if ask and _ggml_op_name(tt.op) == "FLASH_ATTN_EXT":
            q, k, mask = tt.src[0].contents, tt.src[1].contents, tt.src[3].contents
            root = ctypes.cast(k.view_src, ctypes.POINTER(Tensor)).contents.name.decode()
            scale = ctypes.cast(ctypes.pointer(tt.op_params), ctypes.POINTER(ctypes.c_float))[0]
            seen[root] = (q.type, k.type, mask.type, tuple(q.ne), tuple(k.ne), scale)
        return False

    spy = GraphSpy()
    spy.cb = C.ggml_backend_sched_eval_callback(cb)
    ctx = _context(model, spy, flash=True)
    assert _decode(ctx, list(range(3, 20)), 0) == 0
    head = 64 // 8  # the synthetic GQA model: n_embd 64, 8 query heads, 2 KV heads
    assert set(seen) == {"cache_k_l0", "cache_k_l1"}
    for q_type, k_type, mask_type, q_ne, k_ne, scale in seen.values():
        assert (q_type, k_type, mask_type) == (0, 1, 1)  # f32 Q, f16 K cache, f16 mask
        assert q_ne == (head, 17, 8, 1)  # (d, n_tokens, n_head): a permuted view
        assert k_ne == (head, 256, 2, 1)  # (d, n_kv, n_head_kv)
        assert scale == pytest.approx(head**-0.5)
    C.llama_free(ctx)
    model.close()


@pytest.mark.parametrize("kv_type, tol", [("f16", 2e-3), ("q8_0", 1e-4), ("q4_0", 1e-4)])
def test_flash_attention_sources_are_intact_when_the_callback_runs(synthetic_dir, kv_type, tol):
    """The fact the path rests on: when the callback runs, the node's Q, K, V and mask still hold what flash
    attention read, and softmax(scale QK^T + mask) from them, times V, is the node's own output (f16 V is
    accumulated in f16 by ggml-cpu, hence the looser bound)."""
    from test_flash_attn_scoring import _run

    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    # heads 32 wide, so that q8_0/q4_0 blocks fit
    wide = str(write_synthetic_llama(synthetic_dir / "facts-wide.gguf", n_head=8, n_head_kv=2, n_embd=256))
    r = _run(wide, flash_attn=True, type_k=kv_type, type_v=kv_type)
    c = r["check"]
    assert c["nodes"] >= 2 * 30  # both layers, every decode
    assert c["max_abs"] <= tol * c["max_ref"], c
    assert r["stats"].layers_scored == 2
    assert r["stats"].peak_cells <= 64 + 32 and r["stats"].tokens_evicted > 0


def test_decode_fails_only_when_no_cell_is_free(gqa_model):
    model = LoadedModel(gqa_model)
    spy = GraphSpy()
    ctx = _context(model, spy, flash=False)
    mem = C.llama_get_memory(ctx)
    assert _decode(ctx, [5] * 64, 0) == 0
    for i in range(3):
        assert _decode(ctx, [5] * 64, 64 * (i + 1)) == 0  # 256 cells full
    assert _decode(ctx, [5], 256) == 1  # "failed to find a memory slot"
    assert C.llama_memory_seq_rm(mem, 0, 0, 100)
    for i in range(100):  # positions may exceed n_ctx once cells are free
        assert _decode(ctx, [5], 256 + i) == 0
    assert C.llama_memory_seq_pos_max(mem, 0) == 355
    C.llama_free(ctx)
    model.close()


@pytest.mark.slow
def test_gemma3_shape_and_iswa(gemma_path):
    model = LoadedModel(gemma_path)
    i = model.info
    assert (i.n_layer, i.n_head, i.n_head_kv, i.n_swa) == (18, 4, 1, 512)
    assert i.n_embd_k_gqa == 256
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.swa_full = 1536, False
    ctx = C.llama_init_from_model(model.ptr, cp)
    assert not C.llama_memory_can_shift(C.llama_get_memory(ctx))  # no context shift on iSWA caches of unequal size
    C.llama_free(ctx)
    cp.swa_full = True
    ctx = C.llama_init_from_model(model.ptr, cp)
    assert C.llama_memory_can_shift(C.llama_get_memory(ctx))  # ... but at equal size it can
    C.llama_free(ctx)
    model.close()


# -- what restoring saved KV into llama.cpp-allocated cells would rely on (docs/recall.md) -------------------------
class StopAtFirstKWrite:
    """An eval callback that asks for the first write into a K cache (layer 0's SET_ROWS), reads the cells it names,
    and returns false once it has run: the scheduler then computes nothing more of that split."""

    def __init__(self, stop: bool = True):
        self.stop, self.asked, self.cells = stop, 0, None
        self.cb = C.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t, ask, _ud):
        tt = ctypes.cast(t, ctypes.POINTER(Tensor)).contents
        if ask:
            self.asked += 1
            return self.cells is None and tt.name.decode().startswith("cache_k_l0")
        s1 = tt.src[1].contents
        self.cells = list(ctypes.cast(s1.data, ctypes.POINTER(ctypes.c_int64))[: s1.ne[0]])
        return not self.stop


def _two_seq_context(model, cb):
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 256, 64, 64, 2, True
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval = cb
    return C.llama_init_from_model(model.ptr, cp)


def test_a_callback_returning_false_stops_the_graph_but_the_cells_are_taken(gqa_model):
    model = LoadedModel(gqa_model)
    full, stop = StopAtFirstKWrite(stop=False), StopAtFirstKWrite()
    for spy in (full, stop):
        ctx = _two_seq_context(model, spy.cb)
        mem = C.llama_get_memory(ctx)
        assert _decode(ctx, list(range(3, 13)), 0, 0) == 0  # llama_decode still succeeds
        assert spy.cells == list(range(10)) and C.llama_memory_seq_pos_max(mem, 0) == 9
        C.llama_free(ctx)
    # the scheduler stopped asking at layer 0's K write: the rest of the graph was never computed
    assert stop.asked * 3 < full.asked
    model.close()


def test_an_empty_second_sequence_takes_any_start_and_hands_its_cells_to_the_first(gqa_model):
    model = LoadedModel(gqa_model)
    spy = StopAtFirstKWrite(stop=False)
    ctx = _two_seq_context(model, spy.cb)
    mem = C.llama_get_memory(ctx)
    assert _decode(ctx, list(range(3, 13)), 0, 0) == 0
    assert _decode(ctx, [20, 21, 22], 50, 0) != 0  # sequence 0 must go on from its last position + 1
    assert _decode(ctx, [20, 21, 22], 100, 1) == 0  # an empty sequence starts anywhere
    assert C.llama_memory_seq_pos_max(mem, 1) == 102
    C.llama_memory_seq_add(mem, 1, 100, 103, -90)  # to positions 10..12 (llama.cpp re-rotates K at the next decode)
    C.llama_memory_seq_cp(mem, 1, 0, -1, -1)
    assert C.llama_memory_seq_rm(mem, 1, -1, -1)
    assert (C.llama_memory_seq_pos_min(mem, 0), C.llama_memory_seq_pos_max(mem, 0)) == (0, 12)
    assert C.llama_memory_seq_pos_max(mem, 1) == -1
    assert _decode(ctx, [30], 13, 0) == 0  # sequence 0 goes on after the handed-over cells
    C.llama_free(ctx)
    model.close()
