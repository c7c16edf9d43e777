"""EngineConfig(score_layers=k): the native policies read the attention of k layers of the scored cache, evenly
spaced over its depth, instead of all of them. Each layer read is a graph split (a synchronisation on a GPU or
RPC) and a fold, so fewer layers cost less; which layers, and that nothing else changes, is tested here."""

from __future__ import annotations

import itertools

import pytest

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.engine.layer_choice import evenly_spaced, layers_to_read

PROMPT = [(i * 7919) % 200 + 10 for i in range(100)]
N_LAYER = 6


@pytest.fixture(scope="module")
def deep(synthetic_dir):
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    return str(write_synthetic_llama(synthetic_dir / "deep.gguf", n_layer=N_LAYER, n_head=4, n_head_kv=2))


def _run(
    path: str,
    score_layers: int | str | None,
    flash_attn: bool = False,
    policy: str = "morphkv",
    recall=None,
    recall_by: str = "bm25",
):
    cfg = EngineConfig(n_ubatch=32, flash_attn=flash_attn, score_layers=score_layers, recall_by=recall_by)
    with Llama(path, kv_budget=48, policy=policy, recall=recall, config=cfg) as llm:
        out = list(itertools.islice(llm.generate(PROMPT, temp=0.0), 20))
        return {
            "tokens": out,
            "kept": sorted(p for p in llm.engine.scorer.cell_positions() if p >= 0),
            "scores": llm.engine.scorer.scores(),
            "layers": llm.engine.scorer.scored_layers(),
            "key_layers": llm.engine.keys.layers if llm.engine.keys is not None else None,
            "stats": llm.stats,
        }


@pytest.mark.parametrize("k, layers", [(1, [5]), (2, [0, 5]), (3, [0, 3, 5]), (4, [0, 2, 3, 5])])
def test_k_layers_evenly_spaced_from_the_first_to_the_last(deep, k, layers):
    r = _run(deep, k)
    assert r["layers"] == layers
    s = r["stats"]
    assert s.layers_scored == k  # the last ubatch folded exactly these
    assert s.syncs_per_decode_step == k  # one node asked for per layer read, host buffers
    assert s.tokens_evicted > 0


@pytest.mark.parametrize("flash_attn", [False, True])
def test_as_many_layers_as_the_model_has_is_every_layer(deep, flash_attn):
    every = _run(deep, "all", flash_attn)
    for k in (N_LAYER, N_LAYER + 10):
        r = _run(deep, k, flash_attn)
        assert r["layers"] == list(range(N_LAYER))
        assert (r["tokens"], r["kept"], r["scores"]) == (every["tokens"], every["kept"], every["scores"])


def test_fewer_layers_change_the_scores(deep):
    """The subset really is what the policy reads: its scores differ from the mean over every layer."""
    assert _run(deep, 2)["scores"] != _run(deep, "all")["scores"]


def test_the_key_log_takes_its_layers_among_those_read(deep):
    r = _run(deep, 3, recall=True, recall_by="both")  # the key log is kept for the attention probe only
    assert r["key_layers"] and set(r["key_layers"]) <= set(r["layers"])


@pytest.mark.parametrize("policy", ["morphkv", "tova", "h2o"])
def test_every_policy_reads_every_layer_by_default(synthetic_dir, policy):
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    path = str(write_synthetic_llama(synthetic_dir / "ten-layers.gguf", n_layer=10, n_head=4, n_head_kv=2))
    assert _run(path, None, policy=policy)["layers"] == list(range(10))
    assert _run(path, 8, policy=policy)["layers"] == evenly_spaced(range(10), 8) == [0, 1, 3, 4, 5, 6, 8, 9]


def test_with_head_weights_the_layer_of_most_weight_is_read():
    """The layers are spread evenly; the one nearest the layer of most head weight moves onto it (layer_choice.py)."""
    n_kv = 3
    w = [0.01] * (30 * n_kv)
    for il, x in ((18, 1.0), (23, 0.6), (2, 0.05)):
        w[il * n_kv] = x
    spread = evenly_spaced(range(30), 8)
    assert spread == [0, 4, 8, 12, 17, 21, 25, 29]
    assert layers_to_read(list(range(30)), 8, w, n_kv) == [0, 4, 8, 12, 18, 21, 25, 29]  # 17 moved onto 18
    w[18 * n_kv] = 0.01
    w[21 * n_kv + 1] = 2.0
    assert layers_to_read(list(range(30)), 8, w, n_kv) == spread  # the top layer is already read
    assert layers_to_read(list(range(30)), 8, None, n_kv) == spread
    assert layers_to_read(list(range(30)), None, w, n_kv) == list(range(30))
    assert layers_to_read([5, 11, 17], 8, w, n_kv) == [5, 11, 17]  # Gemma 3's 3 global layers: all of them


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "8", "every"])
def test_a_bad_score_layers_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="score_layers"):
        EngineConfig(score_layers=bad)


@pytest.mark.slow
def test_smollm2_asked_for_8_layers_reads_8_with_its_copying_heads_and_recall_logs_keys_among_them(smollm2_path):
    cfg = EngineConfig(n_ubatch=128, score_layers=8, recall_by="both")  # "both" keeps the key log
    with Llama(smollm2_path, kv_budget=256, config=cfg) as llm:
        read = llm.engine.scorer.scored_layers()
        w = llm.engine.head_weights
        assert w is not None and len(read) == 8
        n_kv = llm.engine.model.info.n_head_kv
        best = max(range(len(w)), key=w.__getitem__) // n_kv
        assert best in read  # the strongest induction head's layer is read
        llm.create_chat_completion([{"role": "user", "content": "Tell me a story about a lighthouse."}], max_tokens=400)
        assert llm.stats.tokens_evicted > 0
        assert llm.engine.keys is not None and set(llm.engine.keys.layers) <= set(read)
        assert llm.stats.syncs_per_decode_step == 8


def test_the_key_log_stages_its_own_layers_only(deep):
    """StreamingLLM reads no attention, so every node asked for is the key log's: 4 of the 6 layers (the upper two
    thirds), and the other layers' keys are not staged. With recall by the words alone (the default) nothing is
    asked for at all."""
    with Llama(deep, kv_budget=48, policy="streaming", recall=True, config=EngineConfig(n_ubatch=32)) as llm:
        list(itertools.islice(llm.generate(PROMPT, temp=0.0), 20))
        assert llm.engine.keys is None and llm.stats.syncs_per_decode_step == 0
    cfg = EngineConfig(n_ubatch=32, recall_by="both")
    with Llama(deep, kv_budget=48, policy="streaming", recall=True, config=cfg) as llm:
        list(itertools.islice(llm.generate(PROMPT, temp=0.0), 20))
        layers = llm.engine.keys.layers
        assert layers == [2, 3, 4, 5]
        assert llm.stats.syncs_per_decode_step == len(layers)
        assert llm.engine.scorer.staged_keys([0], 1, 2) is None
        assert llm.engine.scorer.staged_keys(layers, 1, 2) is not None


def test_rotating_layers_read_every_layer_in_turn(synthetic_dir):
    """rotate_layers: prompt chunks read every layer, decode steps the next ceil(n/k)-th of them in turn."""
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    path = str(write_synthetic_llama(synthetic_dir / "ten-layers.gguf", n_layer=10, n_head=4, n_head_kv=2))
    cfg = EngineConfig(n_ubatch=32, score_layers=4, rotate_layers=True)
    with Llama(path, kv_budget=48, recall=False, config=cfg) as llm:
        per_step = []
        for _ in itertools.islice(llm.generate(PROMPT, temp=0.0), 8):
            per_step.append(llm.stats.layers_scored)
        # the first token comes from the prompt's last chunk (every layer); then ranks 0,3,6,9 / 1,4,7 / 2,5,8
        assert per_step[0] == 10
        assert sorted(set(per_step[1:])) == [3, 4] and sum(per_step[1:4]) == 10
        assert llm.stats.tokens_evicted > 0


def test_long_chunks_read_the_chosen_layers_and_probes_and_short_chunks_every_layer(synthetic_dir):
    """rotate_layers="chunks": a prompt chunk longer than two windows reads the k chosen layers; the probes after it
    (they decide what the prompt keeps) and a short last chunk still read every layer; decode steps read theirs in
    turn."""
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    path = str(write_synthetic_llama(synthetic_dir / "ten-layers.gguf", n_layer=10, n_head=4, n_head_kv=2))
    prompt = [(i * 7919) % 200 + 10 for i in range(400)]
    cfg = EngineConfig(n_ubatch=128, score_layers=4, rotate_layers="chunks")
    with Llama(path, kv_budget=160, recall=False, config=cfg) as llm:
        scorer, seen = llm.engine.scorer, []
        begin, end = scorer.begin, scorer.end

        def seen_begin(first_pos, m, last_chunk, probe=False, *rest):
            seen.append([m, probe])
            begin(first_pos, m, last_chunk, probe, *rest)

        scorer.begin = seen_begin
        scorer.end = lambda: (end(), seen[-1].append(llm.stats.layers_scored))
        steps = []
        for _ in itertools.islice(llm.generate(prompt, temp=0.0), 4):
            steps.append(llm.stats.layers_scored)
        assert llm.stats.tokens_evicted > 0 and llm.stats.peak_cells <= 160 + 128
        window = llm.engine.policy.protected_recent
    long_chunks = [n for m, probe, n in seen if m > 2 * window and not probe]
    assert len(long_chunks) >= 3 and set(long_chunks) == {4}
    assert all(n == 10 for m, probe, n in seen if probe or 1 < m <= 2 * window)
    assert any(probe for _, probe, _ in seen) and seen[-1][0] == 1  # probes ran; then decode steps
    assert sorted(set(steps[1:])) == [3, 4]  # decode steps: a third of the layers in turn, as with True


def test_rotate_layers_must_be_a_bool_or_chunks():
    for bad in (1, "yes"):
        with pytest.raises(ValueError, match="rotate_layers"):
            EngineConfig(rotate_layers=bad)


@pytest.mark.parametrize(
    "n_layer, off_host, flash_attn, score_layers, want",
    [
        (30, False, False, None, (None, False)),  # on the host the row is written out; a read is a fold: every layer
        # SmolLM2 off the host: a quarter of its layers a step, in turn, and 8 chosen ones for long prompt chunks
        (30, True, False, None, (8, "chunks")),
        (30, False, True, None, (8, "chunks")),  # flash attention on the host: each read recomputes q.K, so the same
        (64, True, False, None, (16, "chunks")),  # a deeper model: still every layer once in 4 steps
        (18, True, True, None, (8, "chunks")),  # Gemma 3: 8 >= its 3 global layers, so every scored layer every step
        (6, True, True, None, (None, False)),  # too few layers to share out
        (30, True, True, "all", (None, False)),  # an explicit setting wins
        (30, False, True, 4, (4, False)),
    ],
)
def test_where_reads_cost_the_default_reads_a_quarter_of_the_layers_in_turn(
    n_layer, off_host, flash_attn, score_layers, want
):
    from pymorph_edge.engine.engine_config import resolve_score_layers
    from pymorph_edge.policies import make_policy

    cfg = EngineConfig(score_layers=score_layers)
    assert resolve_score_layers(cfg, make_policy("morphkv"), n_layer, off_host, flash_attn) == want


def test_layers_are_off_the_host_only_on_a_device_that_holds_them(deep):
    """n_gpu_layers on a llama.cpp with no GPU leaves every layer on the CPU (RPC: tests/test_rpc.py)."""
    from pymorph_edge.model.rpc_backend import has_gpu_device

    with Llama(deep, kv_budget=48, n_gpu_layers=-1, config=EngineConfig(n_ubatch=32)) as llm:
        assert llm.engine.model.offloaded == has_gpu_device()
    with Llama(deep, kv_budget=48, config=EngineConfig(n_ubatch=32)) as llm:
        assert not llm.engine.model.offloaded
        assert llm.engine.scorer.read_cap is None and not llm.engine.scorer.rotates


def test_flash_attention_on_the_host_reads_a_quarter_of_the_layers_in_turn(synthetic_dir):
    """Each read recomputes q.K with flash attention on, so the host takes the off-host rule (12 layers: 8 a step)."""
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    path = str(write_synthetic_llama(synthetic_dir / "deeper.gguf", n_layer=12, n_head=4, n_head_kv=2))
    for flash_attn, want in ((True, (8, "chunks")), (False, (None, False))):
        with Llama(path, kv_budget=48, flash_attn=flash_attn, config=EngineConfig(n_ubatch=32)) as llm:
            assert not llm.engine.model.offloaded
            assert (llm.engine.scorer.read_cap, llm.engine.scorer.rotates) == want
            llm.engine.decode(PROMPT)  # and it runs: the cache stays bounded
            assert llm.stats.tokens_evicted > 0 and llm.stats.peak_cells <= 48 + 32
