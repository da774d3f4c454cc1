"""PDF input of the OCR model: detect it, count its pages, render each page to pixels.

Pages are rendered with pypdfium2 (PDFium, permissive licence) at ``dpi`` (default 144,
the scale of 2.0 PaddleX renders PDFs at) to BGR uint8 arrays, the colour order of
:func:`models.ocr.imaging.decode_image`. Every limit is checked before the pixels it guards
are allocated: the page count against ``max_pages`` once the document is open, and each
page's size at ``dpi`` against ``max_page_pixels`` from its declared size in points.
Errors are :class:`~models.base.InvalidInput` (corrupt, truncated, encrypted, no pages) or
:class:`~models.base.ResourceLimit` (too many pages, a page too large), with a message the
caller can act on. PDFium is not thread-safe, so every call into it holds one lock.
"""

from __future__ import annotations

import threading

import numpy as np

from models.base import InvalidInput, ResourceLimit

__all__ = ["DEFAULT_PDF_DPI", "is_pdf", "pdf_page_count", "render_pdf_page"]

DEFAULT_PDF_DPI = 144
_MAGIC = b"%PDF-"
_LOCK = threading.Lock()


def is_pdf(data: bytes) -> bool:
    """True for bytes that start like a PDF file (``%PDF-``, leading whitespace allowed)."""
    return bytes(data[:1024]).lstrip().startswith(_MAGIC)


def _open(data: bytes):  # noqa: ANN202 - a pypdfium2.PdfDocument
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(bytes(data))
    except pdfium.PdfiumError as exc:
        text = str(exc).lower()
        if "password" in text or "security" in text:
            raise InvalidInput(
                "the PDF is encrypted (it needs a password to open); send it decrypted"
            ) from None
        raise InvalidInput(
            f"the PDF could not be read ({exc}); the file is corrupt or truncated: "
            "send the complete PDF file"
        ) from None


def pdf_page_count(data: bytes, max_pages: int) -> int:
    """The number of pages, read without rendering any. Raises InvalidInput (corrupt,
    truncated, encrypted, no pages) or ResourceLimit (more than ``max_pages``)."""
    with _LOCK:
        doc = _open(data)
        try:
            n_pages = len(doc)
        finally:
            doc.close()
    if n_pages == 0:
        raise InvalidInput("the PDF has no pages")
    if n_pages > max_pages:
        raise ResourceLimit(
            f"the PDF has {n_pages} pages, over the limit of max_pdf_pages={max_pages}; "
            "split it and send the parts"
        )
    return n_pages


def render_pdf_page(data: bytes, index: int, dpi: int, max_pixels: int) -> np.ndarray:
    """Page ``index`` (0-based) of the PDF ``data`` as a BGR uint8 image at ``dpi``; its
    size is checked against ``max_pixels`` before it is rendered."""
    import pypdfium2 as pdfium

    scale = dpi / 72.0
    with _LOCK:
        doc = _open(data)
        try:
            try:
                page = doc[index]
            except (pdfium.PdfiumError, IndexError) as exc:
                raise InvalidInput(
                    f"page {index + 1} of the PDF could not be read ({exc})"
                ) from None
            try:
                array = _render(page, index, scale, dpi, max_pixels)
            finally:
                page.close()
        finally:
            doc.close()
    if array.ndim == 2:
        array = np.repeat(array[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _render(page, index: int, scale: float, dpi: int, max_pixels: int) -> np.ndarray:  # noqa: ANN001
    import pypdfium2 as pdfium

    width_pt, height_pt = page.get_size()
    width, height = round(width_pt * scale), round(height_pt * scale)
    if width * height > max_pixels:
        raise ResourceLimit(
            f"page {index + 1} of the PDF is {width}x{height} = {width * height} pixels at "
            f"{dpi} dpi, over the limit of max_pdf_page_pixels={max_pixels}; send smaller pages"
        )
    if min(width, height) < 4:
        raise InvalidInput(
            f"page {index + 1} of the PDF is {width}x{height} pixels at {dpi} dpi, "
            "too small to hold text"
        )
    try:
        bitmap = page.render(scale=scale, rev_byteorder=False, may_draw_forms=False)
    except pdfium.PdfiumError as exc:
        raise InvalidInput(f"page {index + 1} of the PDF could not be rendered ({exc})") from None
    try:
        # PDFium's default bitmap is BGR (BGRx with alpha), the order the models expect.
        return np.array(bitmap.to_numpy(), dtype=np.uint8, copy=True)
    finally:
        bitmap.close()
