"""Fast ERNIE tokenizer giving exactly the ids of PaddleNLP 2.8.1's ``ErnieTokenizer``.

Used by the ERNIE adapter to build model inputs and, above all, to count billed tokens:
the bill is ``len(input_ids)`` with [CLS]/[SEP] after truncation, so this must agree with
PaddleNLP id for id (tests/test_ernie_tokenizer.py checks it against the real thing).

Pipeline, in PaddleNLP's order (``PretrainedTokenizer.tokenize`` -> ``BasicTokenizer`` ->
``WordpieceTokenizer``), each step one C-speed pass instead of per-character Python:

1. special tokens typed in the text ("[SEP]") are split out and kept whole, as
   ``from_pretrained`` registers them never-split; the rest is lowercased character by
   character when ``do_lower_case`` (PaddleNLP's ``re.sub(".+?")`` pass, so no final-sigma);
2. ``_clean_text``: NUL, U+FFFD and control characters removed, whitespace -> space;
3. CJK ideographs become words of their own;
4. with lowercasing: NFD and nonspacing marks (Mn) dropped (accent stripping);
5. whitespace split, each punctuation *or symbol* character its own word (PaddleNLP's
   ``_is_punctuation or _is_symbol``: category P, S, ASCII non-alnum and a few extras);
6. WordPiece, greedy longest match with "##" continuation, words over 100 characters
   become [UNK] (short words spelled in Python, long ones by HF ``tokenizers``' WordPiece,
   the identical algorithm; results kept in a per-tokenizer word cache).

Truncation mirrors ``truncate_sequences``: a single text loses tokens from its end
(and, like PaddleNLP, is left alone when it would have to lose all of them); a pair
loses one token at a time from the longer side, the second on ties ("longest_first").
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer
from tokenizers.models import WordPiece
from tokenizers.pre_tokenizers import WhitespaceSplit

from models.ernie._chars import char_tables

__all__ = ["Encoding", "ErnieTokenizerFast"]

_SPECIAL_KEYS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
_MAX_CHARS_PER_WORD = 100  # WordpieceTokenizer.max_input_chars_per_word
_CACHE_LIMIT = 200_000  # words; the cache is dropped and rebuilt past this
# Words up to this length are spelled in Python (a dict lookup or two, ~1 us); longer
# ones go to the Rust WordPiece, which wins once the quadratic search dominates.
_SHORT_WORD = 16


class Encoding(NamedTuple):
    """One encoded input: model ids, segment ids, and whether truncation cut tokens."""

    input_ids: list[int]
    token_type_ids: list[int]
    truncated: bool


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return data


def _token_value(value: object) -> str | None:
    if isinstance(value, dict):  # an AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_vocab(path: str | os.PathLike[str]) -> dict[str, int]:
    """vocab.txt -> {token: id}, read as PaddleNLP's ``load_vocabulary`` reads it.

    Line number is the id; text mode (universal newlines) and ``rstrip("\\n")`` only;
    a duplicated token keeps its last line, as PaddleNLP's dict assignment does.
    """
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            vocab[line.rstrip("\n")] = index
    return vocab


class ErnieTokenizerFast:
    """ERNIE WordPiece tokenizer; thread-safe for concurrent ``encode`` calls."""

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        do_lower_case: bool = True,
        special_tokens: dict[str, str] | None = None,
        additional_special_tokens: Sequence[str] = (),
    ) -> None:
        specials = dict(_DEFAULT_SPECIALS)
        for key, value in (special_tokens or {}).items():
            if key not in _DEFAULT_SPECIALS:
                raise ValueError(f"unknown special token key {key!r}; use {_SPECIAL_KEYS}")
            specials[key] = value
        for key in ("unk_token", "cls_token", "sep_token"):
            if specials[key] not in vocab:
                raise ValueError(f"{key} {specials[key]!r} is not in the vocabulary")
        self.vocab = vocab
        self.do_lower_case = bool(do_lower_case)
        self.special_tokens = specials
        self.unk_id = vocab[specials["unk_token"]]
        self.cls_id = vocab[specials["cls_token"]]
        self.sep_id = vocab[specials["sep_token"]]
        never_split = set(specials.values()) | set(additional_special_tokens)
        # Special token typed in the text -> its id (unknown ones count as [UNK], as
        # PaddleNLP's convert_tokens_to_ids does).
        self._special_ids = {tok: vocab.get(tok, self.unk_id) for tok in never_split}
        # Longest first, so a token that is a prefix of another never wins wrongly.
        alternatives = sorted(never_split, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in alternatives))
        self._tables = char_tables()
        wordpiece = Tokenizer(
            WordPiece(
                vocab,
                unk_token=specials["unk_token"],
                max_input_chars_per_word=_MAX_CHARS_PER_WORD,
            )
        )
        # Words reach it space-joined and free of any whitespace (step 5 removed it).
        wordpiece.pre_tokenizer = WhitespaceSplit()
        self._wordpiece = wordpiece
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> ErnieTokenizerFast:
        """Load from a model directory's vocab.txt, tokenizer_config.json and
        special_tokens_map.json (the last two optional). Raises FileNotFoundError /
        ValueError naming the bad file."""
        directory = Path(path)
        vocab_file = directory / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"no vocab.txt in {str(directory)!r}")
        config = _read_json(directory / "tokenizer_config.json")
        config.update(_read_json(directory / "special_tokens_map.json"))
        specials = {}
        for key in _SPECIAL_KEYS:
            value = _token_value(config.get(key))
            if value is not None:
                specials[key] = value
        extra = [
            t for t in map(_token_value, config.get("additional_special_tokens") or []) if t
        ]
        return cls(
            load_vocab(vocab_file),
            do_lower_case=bool(config.get("do_lower_case", True)),
            special_tokens=specials,
            additional_special_tokens=extra,
        )

    # -- tokenizing -------------------------------------------------------------------

    def _words(self, text: str) -> list[str]:
        """BasicTokenizer on one special-token-free segment (steps 1-5)."""
        tables = self._tables
        if self.do_lower_case:
            # Per-character lowering (PaddleNLP lowers one regex match of one character
            # at a time): only U+03A3 differs from str.lower(), which applies final sigma.
            text = text.replace("\u03a3", "\u03c3").lower()
        if text.isascii():  # no CJK, NFD is the identity: clean and split in one pass
            return text.translate(tables.clean_and_punctuation).split()
        if not self.do_lower_case:
            text = text.translate(tables.clean_and_punctuation)
            if tables.astral.search(text):
                text = tables.clean_astral(text)  # astral punctuation was split already
            return text.split()
        text = text.translate(tables.clean)
        if tables.astral.search(text):
            text = tables.clean_astral(text)
        text = unicodedata.normalize("NFD", text)
        return text.translate(tables.marks_and_punctuation).split()

    def _word_ids(self, words: list[str]) -> list[int]:
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()  # racing threads at worst recompute a word
        ids: list[int] = []
        for word in words:
            pieces = cache.get(word)
            if pieces is None:
                pieces = cache[word] = self._wordpiece_ids(word)
            ids.extend(pieces)
        return ids

    def _wordpiece_ids(self, word: str) -> tuple[int, ...]:
        """WordPiece of one word: greedy longest match, "##" continuations, [UNK] for a
        word that cannot be spelled or is over 100 characters."""
        if len(word) > _SHORT_WORD:
            # Rust does the O(n^2) substring search of long words; a call costs ~15 us.
            return tuple(self._wordpiece.encode(word, add_special_tokens=False).ids)
        vocab = self.vocab
        ids: list[int] = []
        start, n = 0, len(word)
        while start < n:
            end = n
            while start < end:
                piece = vocab.get(word[start:end] if start == 0 else "##" + word[start:end])
                if piece is not None:
                    break
                end -= 1
            else:
                return (self.unk_id,)
            ids.append(piece)
            start = end
        return tuple(ids)

    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without [CLS]/[SEP] and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = []
        position = 0
        for match in self._special_re.finditer(text):
            if match.start() > position:
                ids.extend(self._word_ids(self._words(text[position : match.start()])))
            ids.append(self._special_ids[match.group()])
            position = match.end()
        if position < len(text):
            ids.extend(self._word_ids(self._words(text[position:])))
        return ids

    # -- encoding ---------------------------------------------------------------------

    def encode(
        self, text: str, text_pair: str | None = None, max_seq_len: int | None = None
    ) -> Encoding:
        """[CLS] text [SEP] (text_pair [SEP]), truncated to ``max_seq_len`` tokens."""
        if max_seq_len is not None and (
            isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1
        ):
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        first = self.tokenize_ids(text)
        second = None if text_pair is None else self.tokenize_ids(text_pair)
        return self._assemble(first, second, max_seq_len)

    def _assemble(
        self, first: list[int], second: list[int] | None, max_seq_len: int | None
    ) -> Encoding:
        specials = 2 if second is None else 3
        total = len(first) + (len(second) if second is not None else 0) + specials
        truncated = False
        if max_seq_len is not None and total > max_seq_len:
            remove = total - max_seq_len
            if second is None:
                # PaddleNLP truncates a single text only when something is left of it.
                if len(first) > remove:
                    first = first[:-remove]
                    truncated = True
            else:
                first, second = _longest_first(first, second, remove)
                truncated = True
        ids = [self.cls_id, *first, self.sep_id]
        types = [0] * len(ids)
        if second is not None:
            ids += second
            ids.append(self.sep_id)
            types += [1] * (len(second) + 1)
        return Encoding(ids, types, truncated)

    def encode_batch(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str | None] | None = None,
        max_seq_len: int | None = None,
    ) -> list[Encoding]:
        """``encode`` for each text (and its pair, when ``text_pairs`` is given)."""
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(
                f"text_pairs has {len(text_pairs)} items but texts has {len(texts)}"
            )
        pairs = text_pairs if text_pairs is not None else [None] * len(texts)
        return [self.encode(t, p, max_seq_len) for t, p in zip(texts, pairs, strict=True)]

    def count(
        self, text: str, text_pair: str | None = None, max_seq_len: int | None = None
    ) -> int:
        """Billed tokens: len(input_ids) with [CLS]/[SEP], after truncation."""
        return len(self.encode(text, text_pair, max_seq_len).input_ids)


def _longest_first(
    first: list[int], second: list[int], remove: int
) -> tuple[list[int], list[int]]:
    """PaddleNLP's longest_first loop on lengths: one token at a time off the longer
    list, off the second when they are equal; an empty list stays empty."""
    a, b = len(first), len(second)
    for _ in range(remove):
        if a > b:
            a -= 1
        elif b > 0:
            b -= 1
        else:
            break  # both empty: PaddleNLP's pair_ids[:-1] of [] removes nothing
    return first[:a], second[:b]
