import numpy as np
import pytest

from poetgen.errors import VocabError
from poetgen.data.vocab import EOT, EOT_ID, UNK, UNK_ID, Vocab


def test_from_counts_orders_by_frequency_then_codepoint():
    v = Vocab.from_counts({"b": 3, "a": 3, "c": 5, "d": 1})
    assert v.symbols == [EOT, UNK, "c", "a", "b", "d"]
    assert v.counts == [0, 0, 5, 3, 3, 1]


def test_min_count_sends_rare_symbols_to_unk():
    v = Vocab.from_counts({"a": 5, "b": 1, "c": 2}, min_count=2)
    assert v.symbols == [EOT, UNK, "a", "c"]
    assert v.counts[UNK_ID] == 1
    assert v.encode("abc", on_unknown="unk") == [2, UNK_ID, 3]


def test_encode_error_names_every_unknown_character():
    v = Vocab.from_counts({"床": 1, "前": 1})
    with pytest.raises(VocabError) as e:
        v.encode("床前明月\x07")
    assert "'明'" in str(e.value) and "'月'" in str(e.value) and "U+0007" in str(e.value)
    assert v.encode("床x前", on_unknown="skip") == [v.id("床"), v.id("前")]


def test_decode_roundtrip_and_specials():
    v = Vocab.from_counts({"春": 2, "眠": 1})
    ids = v.encode("春眠") + [EOT_ID, UNK_ID]
    assert v.decode(ids, eot="|", unk="?") == "春眠|?"
    with pytest.raises(VocabError):
        v.decode([99])


def test_serialisation_roundtrip_and_version_check(tmp_path):
    v = Vocab.from_counts({"a": 2, "é": 1})
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == v
    d = v.to_dict()
    d["format_version"] = 99
    with pytest.raises(VocabError, match="newer"):
        Vocab.from_dict(d)
    with pytest.raises(VocabError):
        Vocab.from_dict({"format": "something else"})
    with pytest.raises(VocabError):
        Vocab(["a", EOT, UNK])


def test_dtype_follows_size_and_lookup_table():
    small = Vocab.from_counts({"a": 1})
    assert small.dtype() == np.uint16
    big = Vocab([EOT, UNK] + [chr(0x4E00 + i) for i in range(20000)] + [chr(0x20000 + i) for i in range(50000)])
    assert big.dtype() == np.uint32
    table = small.lookup_table()
    assert table[ord("a")] == 2 and table[ord("b")] == UNK_ID
