"""A saved state carries the log's sentence cuts (engine/span_index.py), so a conversation put back chooses from them
instead of cutting its whole log again; a session file carries none, and the first request cuts afresh."""

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine import recall
from pymorph_edge.engine.recall_select import sentences
from pymorph_edge.engine.span_index import SpanIndex

FILLER = "The tired traveller walked slowly along the narrow harbour road while the rain kept falling. " * 6
FACTS = "The code for Maria is 48213. The code for Tom is 90517. The code for Aiko is 27364.\n"
CUE = " As recorded at the start, the code for Tom is"


def counted_cuts(monkeypatch) -> list[int]:
    """Every SpanIndex._cut from here on appends its start."""
    calls: list[int] = []
    real = SpanIndex._cut

    def cut(self, at, *a):
        calls.append(at)
        return real(self, at, *a)

    monkeypatch.setattr(SpanIndex, "_cut", cut)
    return calls


def spans_now(llm) -> list[tuple[int, int, tuple[str, ...]]]:
    """The evicted sentences as recall sees them from the engine's index, and cut afresh: they must agree."""
    eng = llm.engine
    runs = recall.evicted_runs(eng)
    got = recall.evicted_spans(eng, runs, llm._piece_text)
    fresh = sentences(runs, eng.log.tokens, llm._piece_text, recall.MAX_SPAN_TOKENS)
    assert [(s.lo, s.hi, s.sequence) for s in got] == [(s.lo, s.hi, s.sequence) for s in fresh]
    return [(s.lo, s.hi, s.sequence) for s in got]


def test_a_reloaded_state_chooses_from_the_cuts_it_was_saved_with(gqa_model, monkeypatch, tmp_path):
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=1, temperature=0.0)
        before = spans_now(llm)  # the index holds every cut of the evicted log now
        assert before and llm.stats.tokens_evicted > 0
        calls = counted_cuts(monkeypatch)
        spans_now(llm)
        # a look with every cut kept still reads each run's unfinished last sentence (the index keeps only whole ones)
        again = sorted(calls)
        assert len(again) < len(before)
        saved = llm.save_state()
        n_cuts = len(llm.engine.span_index)
        llm.create_completion(text + FILLER + CUE, max_tokens=1, temperature=0.0)  # the live index moves on
        assert len(llm.engine.span_index) > n_cuts

        calls.clear()
        llm.load_state(saved)
        assert len(llm.engine.span_index) == n_cuts
        assert spans_now(llm) == before and sorted(calls) == again  # nothing whole cut again

        # loaded a second time, the snapshot's cuts are as saved: the request in between did not change them
        llm.create_completion(text + FILLER + CUE, max_tokens=1, temperature=0.0)
        spans_now(llm)
        calls.clear()
        llm.load_state(saved)
        assert spans_now(llm) == before and sorted(calls) == again

        # a session file carries no cuts: its first look cuts the log again, to the same spans
        path = tmp_path / "chat.session"
        llm.save_session(path)
        llm.reset()
        llm.load_session(path)
        calls.clear()
        assert spans_now(llm) == before and len(calls) > len(again)


def test_a_rollback_after_a_reload_still_gives_the_spans_of_the_log_as_it_is(gqa_model):
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        text = FACTS + FILLER
        llm.create_completion(text + FILLER, max_tokens=1, temperature=0.0)
        spans_now(llm)
        saved = llm.save_state()
        llm.create_completion(text + FILLER + FILLER, max_tokens=1, temperature=0.0)
        llm.load_state(saved)
        # diverges from the reloaded text halfway: the sequence is truncated there, and the cuts past it go
        llm.create_completion(text + " Something else entirely happened then." + CUE, max_tokens=1, temperature=0.0)
        spans_now(llm)
