"""Scores reduced on the attention's own backend (native/pme_devscore.c), driven on the CPU backend.

A GPU's or an RPC server's attention is reduced there by a small ggml graph, and only the per-cell scores come to
the host. The same graph runs on the CPU backend when a test asks for it (backend_scores("always")), so its
arithmetic is checked here against the host path, which reads the attention in place: with flash attention off
the two must agree to the bit (same element-wise adds in the same order, the row sum in double as ggml's
sum_rows), with it on (ggml's softmax against the host's own kernels) to rounding.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig

PROMPT = [(i * 7919) % 200 + 10 for i in range(100)]
N_LAYER = 2


@pytest.fixture(scope="module")
def gqa(synthetic_dir):
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    return str(write_synthetic_llama(synthetic_dir / "gqa-backend.gguf", n_head=8, n_head_kv=2, n_embd=256))


def _run(
    path: str, mode: str, flash_attn: bool = False, n: int = 20, weights: bool = False, n_ubatch: int = 32, **policy
) -> dict:
    cfg = EngineConfig(n_ubatch=n_ubatch, flash_attn=flash_attn)
    llm = Llama(path, kv_budget=48, config=cfg, recall=False, **policy)
    llm.engine.scorer.backend_scores(mode)
    if weights:  # per-head weights scale each (layer, KV head) on prompt chunks: the graph's mul
        llm.engine.scorer.set_head_weights([0.25, 1.0, 0.5, 0.75][: N_LAYER * 2])
    out = list(itertools.islice(llm.generate(PROMPT, temp=0.0), n))
    result = {
        "tokens": out,
        "kept": sorted(p for p in llm.engine.scorer.cell_positions() if p >= 0),
        "scores": np.array(llm.engine.scorer.scores()),
        "stats": llm.stats,
    }
    llm.close()
    return result


@pytest.mark.parametrize(
    "policy,weights",
    [("morphkv", False), ("morphkv", True), ("h2o", False), ("tova", False), ("snapkv", False)],
)
def test_reduced_on_a_backend_equals_the_host_path_to_the_bit(gqa, policy, weights):
    host = _run(gqa, "never", policy=policy, weights=weights)
    dev = _run(gqa, "always", policy=policy, weights=weights)
    assert host["stats"].tokens_evicted > 0
    assert dev["tokens"] == host["tokens"]
    assert dev["kept"] == host["kept"]
    if policy != "snapkv":  # SnapKV scores once, at the prompt's end; its score array is scratch after that
        assert np.array_equal(dev["scores"], host["scores"])
    # the scores did come from the backend: one read of them per ubatch
    assert dev["stats"].decode_d2h_bytes > 0 and host["stats"].decode_d2h_bytes == 0


def test_chunks_a_probe_supersedes_decide_as_on_the_host(gqa):
    """With 64-token ubatches MorphKV probes the prompt's chunks; the chunks' rows are not sent over, and nothing
    the scorer decides changes."""
    host = _run(gqa, "never", n_ubatch=64)
    dev = _run(gqa, "always", n_ubatch=64)
    assert dev["tokens"] == host["tokens"] and dev["kept"] == host["kept"]
    assert np.array_equal(dev["scores"], host["scores"])


def test_with_flash_attention_on_the_rebuilt_rows_agree_to_rounding(gqa):
    """The first eviction (the prompt's) ranks the same scores: ggml's mul_mat and softmax against the host's
    kernels differ by float rounding only."""
    host = _run(gqa, "never", flash_attn=True, n=1)
    dev = _run(gqa, "always", flash_attn=True, n=1)
    assert host["stats"].tokens_evicted > 0
    np.testing.assert_allclose(dev["scores"], host["scores"], rtol=1e-4, atol=1e-6)
    assert dev["kept"] == host["kept"]


def test_a_decode_step_copies_at_most_two_floats_per_cell(gqa):
    """A decode step sends its own row; in the W steps after a chunk that filled the window, also the suffix sum of
    that chunk's rows still in the ring (native/pme_devring.c). All 19 steps here are such steps."""
    s = _run(gqa, "always")["stats"]
    assert s.d2h_bytes_per_decode_step <= 2 * 4 * s.n_ctx
    assert s.d2h_bytes_per_decode_step >= 2 * 4 * 48  # at least the live cells' row and suffix sum
    # each scored layer's node (the graph splits there) plus the one read of the scores
    assert s.syncs_per_decode_step == N_LAYER + 1


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_a_prompt_chunk_sends_only_what_the_policy_reads(gqa, policy):
    """H2O reads a chunk's per-cell sum, TOVA its last row: one float per cell either way, not the window's rows."""
    s = _run(gqa, "always", policy=policy)["stats"]
    assert 0 < s.d2h_bytes_per_prompt_chunk <= 4 * s.n_ctx


def test_a_chunk_a_probe_supersedes_sends_only_its_max(gqa):
    """MorphKV scores a long prompt's chunks with a probe of its last tokens, whose rows replace the chunk's before
    anything reads them: such a chunk (flagged PME_UB_SUPERSEDED by the engine) sends its per-cell max alone."""
    # 64-token ubatches: room for 32-token chunks next to the 32-token probe
    sent, n_ctx = _sent_per_ubatch(gqa, 64)
    superseded = [b for sup, m, b in sent if sup]
    window_rows = [b for sup, m, b in sent if not sup and m >= 32]
    assert superseded and window_rows
    assert max(superseded) <= 4 * n_ctx  # the max: one float per cell
    assert max(window_rows) <= 2 * 4 * n_ctx  # the max and the window's 32 rows summed


def test_a_chunk_the_next_one_refills_sends_only_its_max(gqa):
    """A chunk that no eviction follows and whose next chunk holds a whole window: nothing reads its last rows
    (the next chunk's replace them in the ring), so it is flagged PME_UB_SUPERSEDED too. Here the first 32-token
    chunk fits the 48-cell budget; the later ones are evicted after and send their rows. (That the scores and
    keep-sets still equal the host path's is test_reduced_on_a_backend_equals_the_host_path_to_the_bit.)"""
    sent, n_ctx = _sent_per_ubatch(gqa, 32)
    assert [sup for sup, _, _ in sent[:3]] == [True, False, False]
    assert sent[0][2] <= 4 * n_ctx and sent[1][2] > sent[0][2]


def test_a_chunk_that_fills_the_window_sends_its_max_and_one_sum(gqa):
    """Its W rows stay on the backend as suffix sums (native/pme_devring.c): the chunk sends its per-cell max and
    the sum of all W rows; a shorter chunk (the prompt's last 4 tokens) sends its rows, its max and the suffix sum
    its rows bring into use."""
    sent, n_ctx = _sent_per_ubatch(gqa, 32)
    full = [b for sup, m, b in sent if not sup and m >= 32]
    assert full and all(b <= 2 * 4 * n_ctx for b in full)
    assert sent[-1][1] == 4 and sent[-1][2] <= (4 + 2) * 4 * n_ctx


def _sent_per_ubatch(path: str, n_ubatch: int) -> tuple[list[tuple[bool, int, int]], int]:
    """(superseded, tokens, bytes its scores took) for each ubatch of PROMPT under MorphKV at budget 48, reduced
    on the (CPU) backend; and n_ctx."""
    with Llama(path, kv_budget=48, config=EngineConfig(n_ubatch=n_ubatch), recall=False) as llm:
        scorer = llm.engine.scorer
        scorer.backend_scores("always")
        sent: list[tuple[bool, int, int]] = []
        begin, end = scorer.begin, scorer.end
        flags: dict[str, object] = {}

        def spy_begin(first_pos, m, last_chunk, probe=False, query=False, superseded=False, restore=False):
            flags.update(superseded=superseded, m=m)
            begin(first_pos, m, last_chunk, probe, query, superseded, restore)

        def spy_end():
            before = llm.stats.prompt_d2h_bytes + llm.stats.decode_d2h_bytes
            end()
            after = llm.stats.prompt_d2h_bytes + llm.stats.decode_d2h_bytes
            sent.append((bool(flags["superseded"]), int(flags["m"]), after - before))

        scorer.begin, scorer.end = spy_begin, spy_end
        llm.engine.decode(PROMPT)
        return sent, llm.stats.n_ctx


def _key_log(path: str, mode: str) -> tuple[np.ndarray, object]:
    # the key log is kept only where recall asks the model's attention ("both" or "attention"; the default is "bm25")
    with Llama(path, kv_budget=48, config=EngineConfig(n_ubatch=32, recall_by="both"), recall=True) as llm:
        llm.engine.scorer.backend_scores(mode)
        list(itertools.islice(llm.generate(PROMPT, temp=0.0), 10))
        assert llm.engine.keys is not None
        return llm.engine.keys.keys().copy(), llm.stats


def test_the_key_logs_rows_staged_on_a_backend_are_the_same_keys(gqa):
    """Recall's key log keeps every new token's keys; on a backend they are copied into a staging tensor by each
    layer's reduction graph and read once per ubatch (native/pme_devkeys.c), not read layer by layer."""
    host, hs = _key_log(gqa, "never")
    dev, ds = _key_log(gqa, "always")
    assert host.shape == dev.shape and host.shape[0] == len(PROMPT) + 9
    assert np.array_equal(host, dev)
    # one read of the scores and one of the keys per decode step, on top of a sync per scored layer
    assert ds.syncs_per_decode_step == N_LAYER + 2
    assert hs.syncs_per_decode_step == N_LAYER


def test_the_max_aggregate_takes_the_host_path(gqa):
    """ggml has no element-wise max to fold heads and layers with: that setting is read through the copy path and
    decides as the host does."""
    host = _run(gqa, "never", policy="morphkv", aggregate="max")
    dev = _run(gqa, "always", policy="morphkv", aggregate="max")
    assert dev["tokens"] == host["tokens"] and dev["kept"] == host["kept"]
    assert np.array_equal(dev["scores"], host["scores"])
    assert dev["stats"].decode_d2h_bytes == 0  # nothing was reduced on the backend


def test_an_unknown_mode_is_refused(gqa):
    with Llama(gqa, kv_budget=48, config=EngineConfig(n_ubatch=32)) as llm:
        with pytest.raises(ValueError, match="'gpu'"):
            llm.engine.scorer.backend_scores("gpu")


def test_a_state_saved_with_the_windows_rows_on_the_backend_continues_to_the_bit(gqa):
    """A 96-token prompt in 32-token chunks ends on a chunk that fills the window: its rows stay on the backend as
    suffix sums. A state saved there brings the sums still in use over once, and a run loaded from it, on the
    backend or on the host path, keeps every later step what the run that never stopped keeps; the backend and the
    host path score the same cache to the bit."""
    cfg = EngineConfig(n_ubatch=32)
    steps = PROMPT[96:] + PROMPT[:8]

    def fresh(mode: str) -> Llama:
        llm = Llama(gqa, kv_budget=48, config=cfg, recall=False)
        llm.engine.scorer.backend_scores(mode)
        return llm

    def trace(llm: Llama) -> list[dict[int, float]]:
        """each step's score of every live position (a loaded state lays the cells out anew)"""
        out = []
        for tok in steps:
            llm.decode_step(tok)
            sc = llm.engine.scorer
            out.append({p: s for p, s in zip(sc.cell_positions(), sc.scores(), strict=True) if p >= 0})
        return out

    with fresh("always") as a, fresh("never") as host:
        a.engine.decode(PROMPT[:96])
        host.engine.decode(PROMPT[:96])
        sent = a.stats.prompt_d2h_bytes
        assert sent <= 3 * 2 * 4 * a.stats.n_ctx  # no chunk's rows came over: they are on the backend
        state = a.save_state()
        assert a.stats.prompt_d2h_bytes == sent  # the save's read is not scoring's
        with fresh("always") as b, fresh("never") as c:
            b.load_state(state)
            c.load_state(state)
            runs = [trace(x) for x in (a, host, b, c)]
    assert len(runs[0]) == len(steps) and all(len(step) == 48 for step in runs[0])
    a_run, host_run, b_run, c_run = runs
    # on the backend or on the host path, from the same cache: the same positions with the same float scores
    assert host_run == a_run and c_run == b_run
    # the loaded runs against the run that never stopped: the same positions at every step, and scores equal but
    # for llama.cpp's rounding. A load packs the cells anew, and the CPU kernels sum a row's cells in lanes laid
    # out by cell index: on an AMD EPYC (AVX2) one score of step 8 moved by 6e-8 (the machines before, to the bit)
    for live, loaded in zip(a_run, b_run, strict=True):
        assert loaded.keys() == live.keys()
        assert all(abs(loaded[p] - live[p]) <= 1e-6 * max(1.0, abs(live[p])) for p in live)
