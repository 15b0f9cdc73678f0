"""Incremental detokenization across multi-byte UTF-8 boundaries."""
import pytest

from kvray.replica.detokenizer import IncrementalDetokenizer
from kvray.replica.models.loader import load_tokenizer, resolve_model

TEXTS = [
    "plain ascii text, with punctuation!",
    "naïve café — 東京 and 北京 🙂🚀 done",
    "emoji run 👩‍👩‍👧‍👦🏳️‍🌈 then ünïcödé ∑∫√ and tabs\tand\nnewlines",
]


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-llama"])
def tokenizer(request):
    return load_tokenizer(resolve_model(f"kvray:{request.param}"))


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prompt = tokenizer("prompt context:", add_special_tokens=False).input_ids
    # Byte-level BPE splits multi-byte characters across tokens: make sure this text does.
    single = [tokenizer.decode([i]) for i in ids]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    assert all("\ufffd" not in d for d in deltas)
    if any(ord(c) > 127 for c in text):
        assert any("\ufffd" in s for s in single), "test text never split a character across tokens"


def test_chunks_of_several_tokens(tokenizer):
    text = TEXTS[1] * 3
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert out == text


def test_ids_past_the_tokenizer_vocab_are_blank(tokenizer):
    ids = tokenizer("abc", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids + [len(tokenizer) + 5]) + detok.flush() == "abc"
