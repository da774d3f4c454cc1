"""Reference row of the OCR bench: PaddleOCR 3.x's own pipeline on our model files.

Runs inside the separate venv ``.venv-bench-paddleocr`` (paddlepaddle 3.3.1 + paddleocr
3.x; it cannot share ours). PaddleOCR 3.x only loads a model directory that carries
PaddleX's ``inference.yml``, so this script builds such directories in a temp dir:
symlinks to the exported PP-OCRv4 det/rec files plus an ``inference.yml`` written from
the PP-OCRv4 configs (det: DB with thresh 0.3 / box_thresh 0.6 / unclip 1.5, limit 960
max side; rec: 3x48x320, CTC with ppocr_keys_v1). Document orientation, unwarping and
text-line orientation are off, so nothing is downloaded. oneDNN on, new IR off: the
same Paddle settings as ours (PaddleX's default new IR crashes on .pdmodel files).

Writes one JSON object to ``--out``: the timing dict of ``time_calls`` plus ``texts`` per image.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

DET_YML = {
    "Global": {"model_name": "PP-OCRv4_mobile_det"},
    "PreProcess": {
        "transform_ops": [
            {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
            {"DetLabelEncode": None},
            {"DetResizeForTest": {"limit_side_len": 960, "limit_type": "max"}},
            {
                "NormalizeImage": {
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                    "scale": "1./255.",
                    "order": "hwc",
                }
            },
            {"ToCHWImage": None},
            {"KeepKeys": {"keep_keys": ["image", "shape", "polys", "ignore_tags"]}},
        ]
    },
    "PostProcess": {
        "name": "DBPostProcess",
        "thresh": 0.3,
        "box_thresh": 0.6,
        "max_candidates": 1000,
        "unclip_ratio": 1.5,
    },
}


def rec_yml(dict_path: Path) -> dict:
    with open(dict_path, encoding="utf-8") as f:
        chars = [line.rstrip("\r\n") for line in f]
    return {
        "Global": {"model_name": "PP-OCRv4_mobile_rec"},
        "PreProcess": {
            "transform_ops": [
                {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
                {"MultiLabelEncode": {"gtc_encode": "NRTRLabelEncode"}},
                {"RecResizeImg": {"image_shape": [3, 48, 320]}},
                {"KeepKeys": {"keep_keys": ["image", "label_ctc", "label_gtc", "length"]}},
            ]
        },
        "PostProcess": {"name": "CTCLabelDecode", "character_dict": chars},
    }


def model_dir(root: Path, name: str, source: Path, config: dict) -> Path:
    target = root / name
    target.mkdir()
    for file in ("inference.pdmodel", "inference.pdiparams"):
        os.symlink(source / file, target / file)
    with open(target / "inference.yml", "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, allow_unicode=True)
    return target


def build_paddleocr(root: Path, args: argparse.Namespace) -> Any:
    """PaddleOCR 3.x's own pipeline on our det/rec files (copied with inference.yml into
    ``root``), det+rec, Paddle Inference with oneDNN, as both reference runners use it."""
    from paddleocr import PaddleOCR

    det = model_dir(root, "det", args.det_model_dir, DET_YML)
    rec = model_dir(root, "rec", args.rec_model_dir, rec_yml(args.rec_char_dict_path))
    return PaddleOCR(
        text_detection_model_name="PP-OCRv4_mobile_det",
        text_detection_model_dir=str(det),
        text_recognition_model_name="PP-OCRv4_mobile_rec",
        text_recognition_model_dir=str(rec),
        use_doc_orientation_classify=False,
        use_doc_unwarping=False,
        use_textline_orientation=False,
        text_det_limit_side_len=960,
        text_det_limit_type="max",
        text_rec_score_thresh=0.5,
        device="cpu",
        engine="paddle_static",
        engine_config={
            "run_mode": "mkldnn",
            "cpu_threads": args.cpu_threads,
            "enable_new_ir": False,
            "mkldnn_cache_capacity": 10,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--det-model-dir", type=Path, required=True)
    parser.add_argument("--rec-model-dir", type=Path, required=True)
    parser.add_argument("--rec-char-dict-path", type=Path, required=True)
    parser.add_argument("--images", type=Path, nargs="+", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--timing-module", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    args = parser.parse_args()

    # The timing loop is the bench's own (stdlib only), so both rows are timed alike.
    spec = importlib.util.spec_from_file_location("bench_timing", args.timing_module)
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)

    with tempfile.TemporaryDirectory() as tmp:
        ocr = build_paddleocr(Path(tmp), args)

        def call(data: bytes) -> list[str]:
            # Decoding is inside the timed call, as it is for our adapter.
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            return list(ocr.predict(img)[0]["rec_texts"])

        images = [p.read_bytes() for p in args.images]
        texts = [call(data) for data in images]
        result = timing.time_calls(call, images, args.seconds)
    result["texts"] = texts
    # A file, not stdout: PaddleX logs to stdout.
    args.out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
