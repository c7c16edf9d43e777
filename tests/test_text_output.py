from pymorph_edge.generation.text_output import TextAssembler


def feed_all(stop, pieces):
    t = TextAssembler(stop)
    out = [t.feed(p) for p in pieces]
    return out, t


def test_stop_string_split_across_tokens_is_never_emitted():
    out, t = feed_all(["END"], [b"hello E", b"N", b"D more"])
    assert "".join(out) == "hello "
    assert t.stopped and t.finish() == ""  # nothing after the stop string comes out later either


def test_held_prefix_is_released_when_it_is_not_a_stop():
    out, t = feed_all(["END"], [b"an E", b"ND", b"x"])
    assert t.stopped and "".join(out) == "an "
    out, t = feed_all(["END"], [b"an E", b"lephant"])
    assert not t.stopped and "".join(out) + t.finish() == "an Elephant"


def test_incomplete_utf8_waits_for_its_continuation():
    snow = "☃".encode()
    t = TextAssembler([])
    assert t.feed(snow[:1]) == ""
    assert t.feed(snow[1:]) == "☃"


def test_generation_chunk_maps_its_finish_to_openai_reasons():
    from pymorph_edge.generation.generation_record import GenerationChunk

    assert GenerationChunk("a", 5).finish_reason is None
    assert GenerationChunk("", 2, "end_of_generation").finish_reason == "stop"
    assert GenerationChunk("", 7, "stop_string").finish_reason == "stop"
    assert GenerationChunk("b", 9, "length").finish_reason == "length"
