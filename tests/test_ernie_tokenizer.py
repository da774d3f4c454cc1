"""Parity of models.ernie.tokenizer with PaddleNLP 2.8.1's ErnieTokenizer, id for id.

The reference runs in its own venv (.venv-paddlenlp, made by
scripts/setup_paddlenlp_venv.sh) through tests/tools/paddlenlp_ids.py, on a seeded corpus
of >= 10,000 hard strings (models/ernie/corpus.py), with lowercasing on and off. The
billed count is len(input_ids), so any id mismatch is a billing bug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.ernie.corpus import hard_corpus
from models.ernie.tokenizer import ErnieTokenizerFast
from models.ernie.vocab import write_tokenizer_files

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PYTHON = Path(
    os.environ.get("PADDLENLP_VENV", ROOT / ".venv-paddlenlp")
) / "bin" / "python"
REFERENCE_TOOL = ROOT / "tests" / "tools" / "paddlenlp_ids.py"
CORPUS_SIZE = 10_000


def _require_reference() -> None:
    if REFERENCE_PYTHON.exists():
        return
    message = (
        f"PaddleNLP reference venv missing ({REFERENCE_PYTHON}); "
        "create it with scripts/setup_paddlenlp_venv.sh"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _reference(vocab_dir: Path, cases: list[dict], tmp_path: Path) -> list[dict]:
    spec = tmp_path / "cases.json"
    out = tmp_path / "reference.json"
    spec.write_text(json.dumps({"vocab_dir": str(vocab_dir), "cases": cases}), encoding="utf-8")
    proc = subprocess.run(
        [str(REFERENCE_PYTHON), str(REFERENCE_TOOL), str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"reference tokenizer failed:\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text(encoding="utf-8"))["results"]


def _describe(tokenizer: ErnieTokenizerFast, ids: list[int]) -> list[str]:
    names = {i: t for t, i in tokenizer.vocab.items()}
    return [names.get(i, f"#{i}") for i in ids]


@pytest.mark.parametrize("do_lower_case", [True, False], ids=["uncased", "cased"])
def test_ids_match_paddlenlp(tmp_path: Path, do_lower_case: bool) -> None:
    _require_reference()
    vocab_dir = write_tokenizer_files(tmp_path / "vocab", do_lower_case=do_lower_case)
    cases = hard_corpus(CORPUS_SIZE, seed=20240 + do_lower_case)
    assert len(cases) >= 10_000
    expected = _reference(vocab_dir, cases, tmp_path)
    tokenizer = ErnieTokenizerFast.from_dir(vocab_dir)

    mismatches = []
    for index, (case, ref) in enumerate(zip(cases, expected, strict=True)):
        ours = tokenizer.encode(case["text"], case["text_pair"], case["max_seq_len"])
        count = tokenizer.count(case["text"], case["text_pair"], case["max_seq_len"])
        if (
            ours.input_ids != ref["input_ids"]
            or ours.token_type_ids != ref["token_type_ids"]
            or count != len(ref["input_ids"])
        ):
            mismatches.append((index, case, ours, ref))

    if mismatches:
        lines = [f"{len(mismatches)} of {len(cases)} cases differ from PaddleNLP; first ones:"]
        for index, case, ours, ref in mismatches[:5]:
            lines += [
                f"case {index}: {case!r}",
                f"  ours ({len(ours.input_ids)}): {_describe(tokenizer, ours.input_ids)}",
                f"  paddlenlp ({len(ref['input_ids'])}): "
                f"{_describe(tokenizer, ref['input_ids'])}",
                f"  token types ours {ours.token_type_ids} paddlenlp {ref['token_type_ids']}",
            ]
        pytest.fail("\n".join(lines))


def test_corpus_is_hard_enough() -> None:
    cases = hard_corpus(CORPUS_SIZE, seed=1)
    texts = [c["text"] for c in cases]
    joined = "".join(texts)
    assert "" in texts
    assert any(t and not t.strip() for t in texts)
    assert sum(c["text_pair"] is not None for c in cases) > 1000
    assert sum(c["max_seq_len"] is not None for c in cases) > 1000
    for needle in ("\u200b", "\u200d", "\x00", "¥", "©", "™", "°", "🇨🇳", "e\u0301", "é", "，"):
        assert needle in joined, needle
    assert any(len(w) > 100 for t in texts for w in t.split())


def test_known_cases(tmp_path: Path) -> None:
    tokenizer = ErnieTokenizerFast.from_dir(write_tokenizer_files(tmp_path))
    cls_id, sep_id, unk_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.unk_id
    assert tokenizer.encode("").input_ids == [cls_id, sep_id]
    assert tokenizer.encode(" \t\u3000").input_ids == [cls_id, sep_id]
    # Accent stripping (NFC and NFD spellings agree), symbol split, CJK one per token.
    assert tokenizer.encode("CAFÉ").input_ids == tokenizer.encode("cafe\u0301").input_ids
    assert _describe(tokenizer, tokenizer.encode("¥100元™")[0][1:-1]) == [
        "¥", "1", "##0", "##0", "元", "™",
    ]
    # Over 100 characters -> one [UNK]; 100 exactly is still spelled out.
    assert tokenizer.encode("a" * 101).input_ids == [cls_id, unk_id, sep_id]
    assert unk_id not in tokenizer.encode("a" * 100).input_ids
    # Typed special tokens stay whole; "[SEP]" in a text is the [SEP] id.
    assert tokenizer.encode("a[SEP]b").input_ids[2] == sep_id
    # Pair truncation: longest first, the second side on ties.
    pair = tokenizer.encode("a b c d e", "x y", max_seq_len=7)
    assert pair.truncated and len(pair.input_ids) == 7
    assert pair.token_type_ids == [0, 0, 0, 0, 1, 1, 1]
    assert tokenizer.count("a b c d e", max_seq_len=4) == 4
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenizer.encode("a", max_seq_len=0)


if __name__ == "__main__":  # pragma: no cover - manual run
    sys.exit(pytest.main([__file__, "-q"]))
