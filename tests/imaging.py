"""Test images for OCR: text rendered with a CJK font, and the corpus the tests share.

The font is WenQuanYi Zen Hei from Debian's ``fonts-wqy-zenhei`` package (it covers
Latin and CJK). Sizes and padding were chosen so the real PP-OCRv4 models read every
corpus image exactly; :func:`same_text` compares ignoring spaces only, because the
recogniser sometimes drops the space between CJK and Latin runs (the characters
themselves must match exactly).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CORPUS",
    "CorpusImage",
    "FONT_PATH",
    "JUDGEMENT_LINES",
    "PDF_DPI",
    "load_font",
    "render_document",
    "render_line",
    "render_pdf",
    "same_text",
]

FONT_PATH = os.environ.get("PADDLE_METER_TEST_FONT", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")


@lru_cache(maxsize=16)
def load_font(size: int) -> ImageFont.FreeTypeFont:
    """The CJK test font at ``size`` px; a clear error when it is not installed."""
    if not os.path.isfile(FONT_PATH):
        raise FileNotFoundError(
            f"CJK test font not found at {FONT_PATH}; install it with "
            "`apt-get install fonts-wqy-zenhei` or point PADDLE_METER_TEST_FONT at a .ttc/.ttf "
            "that covers Chinese"
        )
    return ImageFont.truetype(FONT_PATH, size)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _draw_lines(lines: Sequence[str], size: int, padding: int, spacing: float) -> Image.Image:
    font = load_font(size)
    line_height = int(size * spacing)
    widths = [int(font.getlength(text)) for text in lines]
    width = max(widths) + 2 * padding
    height = line_height * len(lines) + 2 * padding
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(lines):
        draw.text((padding, padding + i * line_height), text, font=font, fill="black")
    return image


def render_line(text: str, size: int = 32, rotate: int = 0, padding: int = 24) -> bytes:
    """One line of black text on white as PNG bytes, turned by ``rotate`` degrees
    (counter-clockwise; 180 gives an upside-down line)."""
    image = _draw_lines([text], size, padding, spacing=1.4)
    if rotate:
        image = image.rotate(rotate, expand=True, fillcolor="white")
    return _png(image)


def render_document(lines: Sequence[str], size: int = 28, padding: int = 32) -> bytes:
    """Several left-aligned lines, top to bottom, as one PNG page."""
    return _png(_draw_lines(list(lines), size, padding, spacing=2.0))


#: the DPI test PDFs are written at: the server's default ``pdf_dpi``, so a page renders back
#: to the very pixels it was drawn with
PDF_DPI = 144


def render_pdf(pages: Sequence[Sequence[str]], size: int = 28, padding: int = 32) -> bytes:
    """A PDF with one page per entry of ``pages`` (each a list of lines drawn as by
    :func:`render_document`), written by Pillow at :data:`PDF_DPI`."""
    images = [_draw_lines(list(lines), size, padding, spacing=2.0) for lines in pages]
    out = io.BytesIO()
    images[0].save(
        out, format="PDF", save_all=True, append_images=images[1:], resolution=float(PDF_DPI)
    )
    return out.getvalue()


# A page shaped like a court judgement (CJK text, case numbers, amounts).
JUDGEMENT_LINES = (
    "北京市朝阳区人民法院",
    "民事判决书",
    "（2026）京0105民初12345号",
    "原告 北京某某科技有限公司",
    "被告 上海某某贸易有限公司",
    "判决被告支付货款人民币128000元",
)


def same_text(got: str, expected: str) -> bool:
    """Equal once spaces are removed (the recogniser's spacing is not what we test)."""
    return got.replace(" ", "") == expected.replace(" ", "")


@dataclasses.dataclass(frozen=True)
class CorpusImage:
    """A rendered image and the lines it must be read as, in reading order."""

    name: str
    lines: tuple[str, ...]
    data: bytes


DOCUMENT_LINES = (
    "增值税发票 金额 1234.56 元",
    "Invoice No. 20261128 Total: 1,234.56 USD",
    "购买方 北京某某科技有限公司",
    "开票日期 2026年11月28日",
)


@lru_cache(maxsize=1)
def _corpus() -> tuple[CorpusImage, ...]:
    return (
        CorpusImage("cjk_invoice", (DOCUMENT_LINES[0],), render_line(DOCUMENT_LINES[0])),
        CorpusImage("english_invoice", (DOCUMENT_LINES[1],), render_line(DOCUMENT_LINES[1])),
        CorpusImage(
            "rotated_180", (DOCUMENT_LINES[0],), render_line(DOCUMENT_LINES[0], rotate=180)
        ),
        CorpusImage("document", DOCUMENT_LINES, render_document(DOCUMENT_LINES)),
    )


class _Corpus:
    """Lazy view of the corpus (rendering needs the font; import must not)."""

    def __iter__(self):  # noqa: ANN204 - iterator of CorpusImage
        return iter(_corpus())

    def __getitem__(self, name: str) -> CorpusImage:
        for item in _corpus():
            if item.name == name:
                return item
        raise KeyError(name)

    def names(self) -> list[str]:
        return [item.name for item in _corpus()]


#: the shared OCR corpus: ``CORPUS["cjk_invoice"]``, ``for item in CORPUS``
CORPUS = _Corpus()
