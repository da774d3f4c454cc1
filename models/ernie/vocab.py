"""A demo WordPiece vocabulary and the PaddleNLP tokenizer files that go with it.

Used by :mod:`models.ernie.demo` (the untrained demo model) and by the tokenizer parity
test and bench. The vocabulary is the PP-OCR character dictionary shipped with
``rapidocr_paddle`` (6,6xx CJK characters, punctuation, Latin letters, digits) plus
common English words, "##" word pieces for every letter and digit (so any ASCII word can
be spelled) and a handful of symbols and emoji; no download involved.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


__all__ = ["SPECIAL_TOKENS", "build_demo_vocab", "ocr_dictionary", "write_tokenizer_files"]

#: id order of the special tokens at the top of the vocabulary, as in ERNIE 3.0's.
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")

_WORDS = _words(
    "the of and to in is was for on that with as by at from it his an were are which "
    "this be or has had not but first one their its new after who they have her she "
    "two been other when there all also into during more time only some would can "
    "over year years most may world between about many up out city three state "
    "under then where these well while used both such through before because made "
    "name school called people being known against part each high national since "
    "however later united any music film including game team season played work "
    "government number general group area use several life became second war "
    "company same university house system family series so four until long no very "
    "hello good bad great price order total invoice amount paid payment bank card "
    "account tax date page text model token tokens meter paddle ernie ocr api "
    "request response server client data model cost bill tenant usage service "
    "un aff able play ing ed er est ly tion ment ness ful less pre re dis over"
)
_SUFFIXES = _words(
    "s es ed ing er ers est ly tion tions ment ments ness ful less able ible al ic "
    "ous ive ize ise ist ism ity"
)
_CASED = _words("Hello The World Paddle ERNIE OCR API Price Total Invoice")
_EXTRA = ["café", "naïve", "é", "ü", "ß", "σ", "ς", "😀", "👍", "🇨", "🇳", "¥", "©", "™", "°", "€"]


def ocr_dictionary() -> list[str]:
    """The characters of PP-OCR's ppocr_keys_v1.txt, in file order, blanks dropped."""
    ref = resources.files("rapidocr_paddle") / "ch_ppocr_rec" / "ppocr_keys_v1.txt"
    lines = ref.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def build_demo_vocab(*, include_cased: bool = True) -> list[str]:
    """Vocabulary tokens in id order: specials, OCR characters, words, pieces, extras.

    Deterministic (no randomness); duplicates are dropped keeping the first.
    ``include_cased`` adds a few capitalised words used when ``do_lower_case`` is off.
    """
    tokens: list[str] = list(SPECIAL_TOKENS)
    tokens += ocr_dictionary()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    tokens += letters + digits + list(_WORDS)
    tokens += ["##" + ch for ch in letters + digits]
    tokens += ["##" + s for s in _SUFFIXES + _WORDS[:60]]
    if include_cased:
        tokens += list(_CASED) + ["##" + ch.upper() for ch in letters]
    tokens += _EXTRA
    return list(dict.fromkeys(tokens))


def write_tokenizer_files(
    out_dir: str | os.PathLike[str],
    tokens: list[str] | None = None,
    *,
    do_lower_case: bool = True,
    max_seq_len: int = 512,
) -> Path:
    """Write vocab.txt, tokenizer_config.json and special_tokens_map.json as PaddleNLP's
    ``save_pretrained`` lays them out; returns the directory. Overwrites those files."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = build_demo_vocab() if tokens is None else tokens
    for token in tokens:
        if "\n" in token or "\r" in token:
            raise ValueError(f"vocabulary token {token!r} contains a line break")
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    config = {
        "tokenizer_class": "ErnieTokenizer",
        "do_lower_case": do_lower_case,
        "model_max_length": max_seq_len,
        **specials,
    }
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", specials)
    return directory


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
