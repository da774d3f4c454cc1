"""Reference ids from PaddleNLP 2.8.1's ErnieTokenizer, run inside the paddlenlp venv.

Called as a subprocess by the tokenizer parity test and the tokenizer bench (the main
venv does not carry paddlenlp). Reads a JSON file
``{"vocab_dir": ..., "cases": [{"text", "text_pair", "max_seq_len"}, ...]}`` and writes
``{"results": [{"input_ids", "token_type_ids"}, ...], "seconds": float, "tokens": int}``.
The tokenizer is loaded with ``ErnieTokenizer.from_pretrained(vocab_dir)`` from the local
directory (``vocab.txt`` + ``tokenizer_config.json``), so nothing is downloaded. ``seconds`` times the
encode loop only, for the bench.

Usage: python paddlenlp_ids.py IN.json OUT.json [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

# Options of tokenizer_config.json / special_tokens_map.json that ErnieTokenizer takes.
_OPTION_KEYS = ("do_lower_case", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _load_options(vocab_dir: str) -> dict:
    options: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(vocab_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            for key in _OPTION_KEYS:
                value = data.get(key)
                if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                    value = value.get("content")
                if value is not None:
                    options[key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--repeat", type=int, default=1, help="encode the corpus N times (bench)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    from paddlenlp.transformers import ErnieTokenizer
    from paddlenlp.utils.log import logger

    # Truncation of pairs warns once per call; silence it so the bench times tokenising.
    logger.set_level("ERROR")
    logging.disable(logging.WARNING)

    with open(args.input, encoding="utf-8") as handle:
        spec = json.load(handle)
    vocab_dir = spec["vocab_dir"]
    # from_pretrained on a local directory is how PaddleNLP loads an exported model's
    # tokenizer (AutoTokenizer does the same); unlike ErnieTokenizer(vocab_file=...) it
    # registers the special tokens as never-split, so "[SEP]" typed in a text is one token.
    # A local path never downloads.
    if not os.path.isfile(os.path.join(vocab_dir, "vocab.txt")):
        raise SystemExit(f"no vocab.txt in {vocab_dir!r}")
    tokenizer = ErnieTokenizer.from_pretrained(vocab_dir, **_load_options(vocab_dir))
    cases = spec["cases"]

    results: list[dict] = []
    start = time.perf_counter()
    for _ in range(max(1, args.repeat)):
        results = []
        for case in cases:
            kwargs = {}
            if case.get("max_seq_len") is not None:
                kwargs = {"max_length": case["max_seq_len"], "truncation": True}
            encoded = tokenizer(
                case["text"], text_pair=case.get("text_pair"), return_token_type_ids=True, **kwargs
            )
            results.append(
                {
                    "input_ids": list(encoded["input_ids"]),
                    "token_type_ids": list(encoded["token_type_ids"]),
                }
            )
    seconds = time.perf_counter() - start
    tokens = sum(len(r["input_ids"]) for r in results)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump({"results": results, "seconds": seconds, "tokens": tokens}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
