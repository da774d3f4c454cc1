"""Tokens/s of models.ernie's tokenizer vs PaddleNLP 2.8.1's ErnieTokenizer, and mismatches.

Both run on the same corpus file (models/ernie/corpus.py, seeded), back to back, each in
its own interpreter timing only its own encode loop (tokenizer construction excluded):
ours in this venv, the reference in .venv-paddlenlp via tests/tools/paddlenlp_ids.py.
Ours is timed on a fresh tokenizer (cold word cache, the conservative number) and on a
second pass (warm cache). Writes docs/bench_tokenizer.md.

Usage: python bench/bench_tokenizer.py [--n 10000] [--seed 7] [--out docs/bench_tokenizer.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PYTHON = Path(os.environ.get("PADDLENLP_VENV", ROOT / ".venv-paddlenlp")) / "bin/python"
REFERENCE_TOOL = ROOT / "tests" / "tools" / "paddlenlp_ids.py"


def _ours(spec_path: Path, out_path: Path) -> None:
    """Child mode: encode the corpus with our tokenizer, write ids and timings."""
    sys.path.insert(0, str(ROOT))
    from models.ernie.tokenizer import ErnieTokenizerFast

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    tokenizer = ErnieTokenizerFast.from_dir(spec["vocab_dir"])  # builds tables: untimed
    cases = spec["cases"]
    timings = []
    results = []
    for _ in range(2):  # pass 1: cold word cache; pass 2: warm
        start = time.perf_counter()
        results = [tokenizer.encode(c["text"], c["text_pair"], c["max_seq_len"]) for c in cases]
        timings.append(time.perf_counter() - start)
    out_path.write_text(
        json.dumps(
            {
                "results": [{"input_ids": r.input_ids, "token_type_ids": r.token_type_ids}
                            for r in results],
                "seconds_cold": timings[0],
                "seconds_warm": timings[1],
                "tokens": sum(len(r.input_ids) for r in results),
            }
        ),
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="corpus size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_tokenizer.md"))
    parser.add_argument("--ours-child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours_child:
        _ours(Path(args.ours_child[0]), Path(args.ours_child[1]))
        return 0
    if not REFERENCE_PYTHON.exists():
        print(f"missing {REFERENCE_PYTHON}; run scripts/setup_paddlenlp_venv.sh", file=sys.stderr)
        return 2

    sys.path.insert(0, str(ROOT))
    from models.ernie.corpus import hard_corpus
    from models.ernie.vocab import write_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vocab_dir = write_tokenizer_files(work / "vocab")
        cases = hard_corpus(args.n, seed=args.seed)
        spec = work / "spec.json"
        spec.write_text(json.dumps({"vocab_dir": str(vocab_dir), "cases": cases}), "utf-8")
        chars = sum(len(c["text"]) + len(c["text_pair"] or "") for c in cases)
        subprocess.run(
            [sys.executable, __file__, "--ours-child", str(spec), str(work / "ours.json")],
            check=True,
        )
        subprocess.run(
            [str(REFERENCE_PYTHON), str(REFERENCE_TOOL), str(spec), str(work / "ref.json")],
            check=True,
            capture_output=True,
        )
        ours = json.loads((work / "ours.json").read_text("utf-8"))
        ref = json.loads((work / "ref.json").read_text("utf-8"))

    mismatches = sum(
        a != b for a, b in zip(ours["results"], ref["results"], strict=True)
    )
    tokens = ref["tokens"]
    ref_rate = tokens / ref["seconds"]
    cold_rate = ours["tokens"] / ours["seconds_cold"]
    warm_rate = ours["tokens"] / ours["seconds_warm"]
    lines = [
        "# ERNIE tokenizer bench: models.ernie vs PaddleNLP 2.8.1 ErnieTokenizer",
        "",
        f"Corpus: `hard_corpus(n={args.n}, seed={args.seed})` (models/ernie/corpus.py): "
        f"{len(cases)} cases, {chars} characters, {tokens} tokens incl. [CLS]/[SEP]; "
        "mixed CJK/Latin/emoji/symbols/control characters, 30% pairs, 35% truncated.",
        "Each tokenizer times only its encode loop in its own interpreter, back to back "
        f"on the same file. Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared, "
        f"noisy), Python {platform.python_version()}. Produced by "
        "`python bench/bench_tokenizer.py`.",
        "",
        "| tokenizer | seconds | tokens/s | speed-up |",
        "| --- | ---: | ---: | ---: |",
        f"| PaddleNLP ErnieTokenizer (reference) | {ref['seconds']:.3f} | {ref_rate:,.0f} | 1.0x |",
        f"| ours, fresh (cold word cache) | {ours['seconds_cold']:.3f} | {cold_rate:,.0f} | "
        f"{cold_rate / ref_rate:.1f}x |",
        f"| ours, second pass (warm cache) | {ours['seconds_warm']:.3f} | {warm_rate:,.0f} | "
        f"{warm_rate / ref_rate:.1f}x |",
        "",
        f"Mismatching cases (input_ids or token_type_ids): **{mismatches}** of {len(cases)}.",
        "",
    ]
    report = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report, encoding="utf-8")
    print(report)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
