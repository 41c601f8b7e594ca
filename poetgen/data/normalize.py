"""Text normalisation, so that one symbol means one thing.

In order: Unicode NFC; optional removal of editorial notes; optional script conversion (OpenCC); for Chinese
text, ASCII punctuation to full width. Everything here works on pieces cut at line breaks, so it can be applied
to a stream.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from poetgen.errors import CorpusError

SCRIPTS = ("keep", "simplified", "traditional")
PUNCT_MODES = ("auto", "fullwidth", "keep")

# CJK Unified Ideographs, Extension A, Compatibility Ideographs, and Extensions B and beyond.
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HAN_RE = re.compile(f"[{HAN}]")
_NONSPACE_RE = re.compile(r"\S")

# Editorial notes in the chinese-poetry files: variant readings "（一作「萬里」）" are dropped whole; a character
# restored by the editors is marked "[爽]" and kept without its brackets.
_NOTE_RE = re.compile(r"（[^（）\n]*）|\([^()\n]*\)")
_RESTORED_RE = re.compile(rf"\[([{HAN}]{{1,4}})\]")

_PUNCT_PAIRS = ((",", "，"), (";", "；"), (":", "："), ("?", "？"), ("!", "！"), ("(", "（"), (")", "）"))
# A full stop only after a Han character or closing bracket/quote, so "3.14" and "e.g." stay as they are.
_STOP_RE = re.compile(rf"(?<=[{HAN}」』）》])\.")

_OPENCC_CONFIG = {"simplified": "t2s", "traditional": "s2t"}


@functools.lru_cache(maxsize=None)
def converter(script: str):
    """An OpenCC converter to ``script`` ("simplified" or "traditional")."""
    try:
        import opencc
    except ImportError:  # pragma: no cover - opencc is a dependency
        raise CorpusError("script conversion needs the 'opencc' package: pip install opencc") from None
    return opencc.OpenCC(_OPENCC_CONFIG[script])


def convert_script(text: str, script: str) -> str:
    if script == "keep" or not text:
        return text
    return converter(script).convert(text)


def han_ratio(text: str) -> float:
    """Share of Han characters among the non-space characters (0 for empty text)."""
    visible = len(_NONSPACE_RE.findall(text))
    return len(_HAN_RE.findall(text)) / visible if visible else 0.0


def is_chinese(text: str) -> bool:
    """Mostly Han characters? Judged on the first 4,096 characters, which is plenty and keeps long pieces cheap."""
    return han_ratio(text[:4096]) >= 0.3


class Normalizer:
    def __init__(self, script: str = "keep", punct: str = "auto", strip_notes: bool = False):
        if script not in SCRIPTS:
            raise CorpusError(f"unknown script {script!r}; choose one of {', '.join(SCRIPTS)}")
        if punct not in PUNCT_MODES:
            raise CorpusError(f"unknown punctuation mode {punct!r}; choose one of {', '.join(PUNCT_MODES)}")
        self.script = script
        self.punct = punct
        self.strip_notes = strip_notes
        if script != "keep":
            converter(script)  # fail early if OpenCC is missing

    def __call__(self, text: str, strip_notes: bool | None = None) -> str:
        text = unicodedata.normalize("NFC", text)
        if self.strip_notes if strip_notes is None else strip_notes:
            text = strip_editorial_notes(text)
        text = convert_script(text, self.script)
        if self.punct == "fullwidth" or (self.punct == "auto" and is_chinese(text)):
            text = fullwidth_punctuation(text)
        return text


def strip_editorial_notes(text: str) -> str:
    text = _NOTE_RE.sub("", text)
    return _RESTORED_RE.sub(r"\1", text)


def fullwidth_punctuation(text: str) -> str:
    # str.replace per mark, and only for marks present: on non-ASCII text this is ~10x faster than str.translate.
    for ascii_mark, wide in _PUNCT_PAIRS:
        if ascii_mark in text:
            text = text.replace(ascii_mark, wide)
    return _STOP_RE.sub("。", text) if "." in text else text
