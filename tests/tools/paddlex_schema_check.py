"""Validate /ocr requests and answers with PaddleX 3.x's OWN schema classes.

Runs inside .venv-paddlex-schema (scripts/setup_paddlex_schema_venv.sh: paddlex with its
serving extra, no paddle). Reads one JSON object from stdin:
``{"requests": [...], "successes": [...], "failures": [...]}`` and validates each request
as ``schemas.ocr.InferRequest``, each success as
``AIStudioResultResponse[schemas.ocr.InferResult]`` and each failure as
``AIStudioNoResultResponse`` (strictly: no field PaddleX lacks, none it needs missing).
Prints one JSON line ``{"ok": N}`` or exits 1 naming the first that does not validate.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from paddlex.inference.serving.infra.models import (
        AIStudioNoResultResponse,
        AIStudioResultResponse,
    )
    from paddlex.inference.serving.schemas import ocr

    document = json.load(sys.stdin)
    success = AIStudioResultResponse[ocr.InferResult]
    checked = 0
    for kind, model in (
        ("requests", ocr.InferRequest),
        ("successes", success),
        ("failures", AIStudioNoResultResponse),
    ):
        for i, item in enumerate(document.get(kind, [])):
            try:
                parsed = model.model_validate(item)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                print(json.dumps({"error": f"{kind}[{i}]: {exc}"}))
                return 1
            if kind != "requests":
                # Round trip: what PaddleX's model dumps is what we sent (no extra fields).
                dumped = parsed.model_dump(mode="json")
                if set(dumped) != set(item):
                    print(json.dumps({"error": f"{kind}[{i}]: fields {sorted(item)} != "
                                      f"schema fields {sorted(dumped)}"}))
                    return 1
                if kind == "successes":
                    for j, res in enumerate(item["result"]["ocrResults"]):
                        if set(res) != set(dumped["result"]["ocrResults"][j]):
                            print(json.dumps({"error": f"{kind}[{i}] ocrResults[{j}] fields"}))
                            return 1
                    if dumped["result"]["dataInfo"] != item["result"]["dataInfo"]:
                        print(json.dumps({"error": f"{kind}[{i}]: dataInfo not as PaddleX's"}))
                        return 1
            checked += 1
    print(json.dumps({"ok": checked}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
