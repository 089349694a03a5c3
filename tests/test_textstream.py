"""Streaming text: whole characters only, stop strings never leak, nothing lost."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgespec.textstream import TextStream


def _stream_bytes(chunks: list[bytes], stop: list[str]) -> tuple[list[str], TextStream]:
    table = dict(enumerate(chunks))
    s = TextStream(lambda ids: b"".join(table[i] for i in ids), stop)
    pieces = [s.push(i) for i in range(len(chunks))]
    pieces.append(s.finish())
    return pieces, s


@given(st.text(max_size=40), st.data())
def test_pieces_reassemble_the_text_at_any_byte_split(text: str, data: st.DataObject) -> None:
    raw = text.encode()
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=10)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    pieces, s = _stream_bytes(chunks, [])
    assert "".join(pieces) == text == s.text
    for p in pieces:
        p.encode()  # every piece is valid text on its own


@given(st.text(alphabet="abc", max_size=30), st.text(alphabet="abc", min_size=1, max_size=3))
def test_stop_string_is_cut_and_never_emitted(text: str, stop: str) -> None:
    chunks = [c.encode() for c in text]
    pieces, s = _stream_bytes(chunks, [stop])
    out = "".join(pieces)
    if stop in text:
        assert out == text[: text.index(stop)] and s.stopped
    else:
        assert out == text and not s.stopped
