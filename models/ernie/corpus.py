"""Deterministic corpus of hard tokenizer inputs, for the parity test and the bench.

Every case is ``{"text", "text_pair", "max_seq_len"}`` (the JSON shape
tests/tools/paddlenlp_ids.py reads). Texts mix CJK (incl. extension B and compatibility
ideographs), Latin with NFC and NFD accents, Greek sigma, digits, half- and full-width
punctuation, symbols (¥ © ™ ° ² µ), emoji with skin tones, ZWJ sequences and flags,
control, zero-width and format characters, odd whitespace, other scripts, special
tokens typed in text, words of 99-150 characters, random code points, empty and
whitespace-only strings; a share are pairs and a share are truncated.
"""

from __future__ import annotations

import random

from models.ernie.vocab import ocr_dictionary


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


__all__ = ["hard_corpus"]

_LATIN = _words(
    "hello world The Price total INVOICE paid payment tokens unaffable playing Played "
    "meter ernie paddle naïve café résumé Straße İstanbul ΑΣ ΟΔΟΣ σοφός ﬁne ǅ Ⅻ x y"
)
_NFD = ["cafe\u0301", "nai\u0308ve", "A\u030angstro\u0308m", "n\u0303", "e\u0301\u0301"]
_PUNCT_HALF = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_PUNCT_FULL = list("，。！？；：“”‘’（）【】《》、·…—～「」『』〈〉％＃＠＆＊ＡＢＣａｂｃ１２３")
_SYMBOLS = list("¥©™°²µºØøŋƱ§¶€£±×÷≈∞→★♥☆✓½¼¹³‰‱")
_EMOJI = [
    "😀", "👍", "👍🏽", "🇨🇳", "🇺🇸", "👨\u200d👩\u200d👧", "1\ufe0f\u20e3", "❤\ufe0f", "🤖", "🏳\ufe0f\u200d🌈",
]
_CONTROL = [
    "\x00", "\x01", "\x07", "\x7f", "\x85", "\x1c", "\x1f", "\u200b", "\u200c", "\u200d",
    "\ufeff", "\u00ad", "\ufffd", "\u2060", "\u202e", "\ue000", "\U000e0041", "\U0010fffd",
]
_SPACES = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\u3000", "\xa0", "\u2002",
           "\u2028", "\u2029", "\u202f", "\u1680", "\u200a", "\u2000"]
_SCRIPTS = ["한국어", "ひらがな", "カタカナ", "ｶﾀｶﾅ", "مرحبا", "नमस्ते", "ภาษาไทย", "Привет", "שָׁלוֹם"]
_SPECIAL = ["[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "[mask]", "[Sep]", "[[CLS]]", "[CLS"]
_CJK_EXTRA = ["𠀀", "𠮷", "𪚥", "豈", "丽", "〇", "㐀", "鿿", "⺀", "⼀"]


def _random_code_point(rng: random.Random) -> str:
    while True:
        cp = rng.choice((rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0x10000),
                         rng.randrange(0x10000, 0x110000)))
        if not 0xD800 <= cp <= 0xDFFF:  # lone surrogates cannot travel as UTF-8
            return chr(cp)


def _long_word(rng: random.Random) -> str:
    length = rng.choice((99, 100, 101, 120, 150))
    alphabet = rng.choice(("ab", "abcdefghij", "é", "中a", "1x"))
    return "".join(rng.choice(alphabet) for _ in range(length))


def _piece(rng: random.Random, cjk: list[str]) -> str:
    kind = rng.random()
    if kind < 0.22:
        return "".join(rng.choice(cjk) for _ in range(rng.randint(1, 8)))
    if kind < 0.40:
        word = rng.choice(_LATIN)
        return rng.choice((word, word.upper(), word.capitalize(), word.lower()))
    if kind < 0.45:
        return rng.choice(_NFD)
    if kind < 0.52:
        return str(rng.choice((rng.randint(0, 10**6), round(rng.uniform(-1e3, 1e3), 2))))
    if kind < 0.60:
        return rng.choice(_PUNCT_HALF)
    if kind < 0.67:
        return rng.choice(_PUNCT_FULL)
    if kind < 0.72:
        return rng.choice(_SYMBOLS)
    if kind < 0.77:
        return rng.choice(_EMOJI)
    if kind < 0.82:
        return rng.choice(_CONTROL)
    if kind < 0.86:
        return rng.choice(_SCRIPTS)
    if kind < 0.89:
        return rng.choice(_SPECIAL)
    if kind < 0.92:
        return rng.choice(_CJK_EXTRA)
    if kind < 0.94:
        return _long_word(rng)
    return "".join(_random_code_point(rng) for _ in range(rng.randint(1, 4)))


def _text(rng: random.Random, cjk: list[str], max_pieces: int) -> str:
    roll = rng.random()
    if roll < 0.02:
        return ""
    if roll < 0.04:
        return "".join(rng.choice(_SPACES) for _ in range(rng.randint(1, 4)))
    parts: list[str] = []
    for _ in range(rng.randint(1, max_pieces)):
        parts.append(_piece(rng, cjk))
        parts.append(rng.choice(("", "", " ", " ", rng.choice(_SPACES))))
    return "".join(parts)


def hard_corpus(n: int = 10_000, *, seed: int = 0, max_pieces: int = 30) -> list[dict]:
    """``n`` cases, the same for the same ``seed``; ~30% pairs, ~35% with max_seq_len."""
    rng = random.Random(seed)
    cjk = [ch for ch in ocr_dictionary() if "\u4e00" <= ch <= "\u9fff"]
    cases: list[dict] = []
    for _ in range(n):
        text = _text(rng, cjk, max_pieces)
        pair = _text(rng, cjk, max_pieces) if rng.random() < 0.3 else None
        max_seq_len = None
        if rng.random() < 0.35:
            max_seq_len = rng.choice((1, 2, 3, 4, 5, 8, 16, 32, 64, 128, rng.randint(1, 96)))
        cases.append({"text": text, "text_pair": pair, "max_seq_len": max_seq_len})
    return cases
