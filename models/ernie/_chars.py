"""Character classes of PaddleNLP's BasicTokenizer, as compiled regexes and tables.

PaddleNLP decides per character with ``unicodedata`` calls in Python loops (2.8.1,
``paddlenlp/transformers/tokenizer_utils.py`` and ``bert/tokenizer.py``). The same
predicates are evaluated here once per process over every code point and turned into
``str.translate`` tables, so tokenizing runs in C. (Regex character classes were tried
first: with hundreds of astral ranges SRE tests them one by one, 3x slower.) Built from the running interpreter's
``unicodedata``, i.e. the same Unicode version PaddleNLP sees in the same Python.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["CharTables", "char_tables", "is_chinese_char", "is_punctuation_or_symbol"]

# PaddleNLP's _is_symbol adds these code points to Unicode category S.
_EXTRA_SYMBOLS = frozenset([0x00AD, 0x00B2, 0x00BA, 0x3007, 0x00B5, 0x00D8, 0x014B, 0x01B1])

# BasicTokenizer._is_chinese_char: the CJK blocks, not Hangul/Kana.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def is_chinese_char(cp: int) -> bool:
    """BasicTokenizer._is_chinese_char."""
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def is_punctuation_or_symbol(ch: str) -> bool:
    """``_is_punctuation(ch) or _is_symbol(ch)``: each such character is its own token."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    category = unicodedata.category(ch)
    return category[0] in "PS" or cp in _EXTRA_SYMBOLS


def _is_control(ch: str) -> bool:
    # _is_control: category C*, except \t \n \r which count as whitespace.
    return ch not in "\t\n\r" and unicodedata.category(ch)[0] == "C"


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


_ASTRAL_START = 0x10000


def _astral_replacement(ch: str) -> str:
    """What the clean + CJK steps make of one character above the BMP."""
    cp = ord(ch)
    if _is_control(ch):
        return ""
    if is_chinese_char(cp):
        return f" {ch} "
    return ch  # no astral whitespace exists


@dataclass(frozen=True)
class CharTables:
    """Per-step lookup tables; each step is one ``str.translate`` pass in C.

    Tables cover the BMP plus the (few) astral punctuation / mark code points; astral
    control and CJK characters (hundreds of thousands of unassigned / private-use code
    points) are handled by :meth:`clean_astral`, only for texts that contain any.
    """

    #: _clean_text (NUL, U+FFFD, controls -> removed; whitespace -> " ") and
    #: _tokenize_chinese_chars (CJK -> " c "), for BMP characters.
    clean: dict[int, str | None]
    #: _run_strip_accents: nonspacing marks (Mn) deleted after NFD.
    nonspacing_marks: dict[int, None]
    #: _run_split_on_punc: punctuation or symbol c -> " c ", so str.split() yields words.
    punctuation: dict[int, str]
    #: ``clean`` and ``punctuation`` in one pass (the key sets are disjoint except U+00AD,
    #: removed first as PaddleNLP does); valid when no NFD runs between the two steps.
    clean_and_punctuation: dict[int, str | None]
    #: ``nonspacing_marks`` and ``punctuation`` in one pass (Mn and P/S are disjoint).
    marks_and_punctuation: dict[int, str | None]
    #: matches any character above the BMP.
    astral: re.Pattern[str]

    def clean_astral(self, text: str) -> str:
        """Clean + CJK steps for the characters above the BMP (Python per character)."""
        return self.astral.sub(lambda m: _astral_replacement(m.group()), text)


@functools.cache
def char_tables() -> CharTables:
    """Build the tables once per process (under a second over all code points)."""
    clean: dict[int, str | None] = {}
    marks: dict[int, None] = {}
    punctuation: dict[int, str] = {}
    for cp in range(0x110000):
        ch = chr(cp)
        category = unicodedata.category(ch)
        if cp < _ASTRAL_START:
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                clean[cp] = None
            elif _is_whitespace(ch):
                clean[cp] = " "
            elif is_chinese_char(cp):
                clean[cp] = f" {ch} "
        if category == "Mn":
            marks[cp] = None
        if is_punctuation_or_symbol(ch):
            punctuation[cp] = f" {ch} "
    return CharTables(
        clean=clean,
        nonspacing_marks=marks,
        punctuation=punctuation,
        clean_and_punctuation={**punctuation, **clean},
        marks_and_punctuation={**punctuation, **marks},
        astral=re.compile("[\U00010000-\U0010ffff]"),
    )
