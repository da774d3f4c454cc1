"""PP-OCRv4 text detection + direction classification + recognition on Paddle Inference.

``OcrAdapter`` is the served model (operation ``ocr``); ``OcrResult`` what it returns
per image.
"""

from models.ocr.adapter import OcrAdapter, OcrResult

__all__ = ["OcrAdapter", "OcrResult"]
