import pytest

from poetgen.errors import CorpusError
from poetgen.data.normalize import Normalizer, fullwidth_punctuation, han_ratio, strip_editorial_notes


def test_nfc_composes():
    assert Normalizer()("e\u0301") == "\u00e9"


def test_editorial_notes_removed_and_restored_characters_kept():
    text = "[爽]節在重九，物華滿（一作「萬」）京城。月(一作日)明"
    assert strip_editorial_notes(text) == "爽節在重九，物華滿京城。月明"


def test_ascii_punctuation_to_fullwidth_only_in_chinese():
    n = Normalizer()
    assert n("床前明月光,疑是地上霜.") == "床前明月光，疑是地上霜。"
    assert n("Hello, world. Pi is 3.14!") == "Hello, world. Pi is 3.14!"
    assert fullwidth_punctuation("约3.14倍?") == "约3.14倍？"
    assert Normalizer(punct="keep")("床前,明月") == "床前,明月"
    assert Normalizer(punct="fullwidth")("a,b") == "a，b"


def test_script_conversion_both_ways():
    assert Normalizer(script="simplified")("舉頭望明月，低頭思故鄉。") == "举头望明月，低头思故乡。"
    assert Normalizer(script="traditional")("举头望明月") == "舉頭望明月"


def test_bad_modes_are_refused():
    with pytest.raises(CorpusError):
        Normalizer(script="latin")
    with pytest.raises(CorpusError):
        Normalizer(punct="weird")


def test_han_ratio():
    assert han_ratio("") == 0.0
    assert han_ratio("春 a") == 0.5
