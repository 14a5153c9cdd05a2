"""SSE parsing: any cut of the byte stream gives the same events as the whole stream."""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.load.sse import SSEEvent, SSEParser

STREAM = ("\ufeff: hello\r\n\r\n"
          "data: {\"text\": \"é日\"}\n\n"
          "event: usage\rid: 7\rdata: line one\rdata: line two\r\r"
          "retry: 1500\ndata:no-space\n\n"
          "data\n\n"
          "event: ignored-without-data\n\n"
          "data: [DONE]\r\n\r\n").encode()

EXPECTED = [
    SSEEvent(comment="hello"),
    SSEEvent(data='{"text": "é日"}'),
    SSEEvent(data="line one\nline two", event="usage", id="7"),
    SSEEvent(data="no-space", id="7", retry=1500),
    SSEEvent(data="", id="7"),
    SSEEvent(data="[DONE]", id="7"),
]


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        events += parser.feed(data[prev:cut])
        prev = cut
    return events + parser.close()


def test_whole_stream():
    events = parse_in_pieces(STREAM, [])
    assert events == EXPECTED
    assert events[1].json() == {"text": "é日"}
    assert events[-1].is_done and not events[1].is_done
    assert events[0].is_comment and not events[0].is_done


def test_byte_at_a_time_splits_utf8_and_crlf():
    assert parse_in_pieces(STREAM, list(range(len(STREAM)))) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_cut_gives_the_same_events(cuts):
    assert parse_in_pieces(STREAM, cuts) == EXPECTED


def test_comments_can_be_dropped_and_trailing_event_is_kept_at_close():
    parser = SSEParser(comments=False)
    assert parser.feed(b": ping\n\ndata: last") == []
    assert parser.close() == [SSEEvent(data="last")]


def test_invalid_utf8_is_replaced_not_raised():
    parser = SSEParser()
    assert parser.feed(b"data: \xff\n\n") == [SSEEvent(data="\ufffd")]
