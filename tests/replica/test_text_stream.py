"""The one text path (engine and Router): stop strings cut, never sent in part (pure Python)."""
from kvray.replica.detokenizer import TextStream

class CharTokenizer:
    """Token i is chr(i); enough for the detokenizer and stop-string logic."""

    def __len__(self):
        return 0x30000

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def ids(s):
    return [ord(c) for c in s]


def test_text_stream_holds_back_a_possible_stop_string():
    ts = TextStream(CharTokenizer(), ids("p"), ["STOP"])
    out = ts.add(ids("hello S"), False)
    assert "S" not in out and out.startswith("hel")
    out += ts.add(ids("TO"), False)
    out += ts.add(ids("P and more"), False)
    assert ts.stop_string == "STOP" and out + ts.add([], True) == "hello "
    assert ts.add(ids("zzz"), True) == ""


def test_text_stream_without_stops_sends_everything():
    ts = TextStream(CharTokenizer(), [], None)
    assert ts.add(ids("ab"), False) + ts.add(ids("cd"), True) == "abcd"
    assert ts.stop_string is None
