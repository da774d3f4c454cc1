"""OcrAdapter in-process with the real PP-OCRv4 Paddle predictors (no mocks).

Text is compared with :func:`imaging.same_text` (spaces ignored; every other character
must match) because PP-OCRv4 sometimes drops the space between words of one line.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from models.base import InvalidInput, ModelError, ResourceLimit
from models.ocr import OcrAdapter, OcrResult
from models.ocr.postprocess import build_postprocess
from models.runtime import PredictorPool, RuntimeOptions
from models.usage import RequestUsage, bind_usage, set_stage_factory

try:  # tests/ may or may not be a package, depending on how pytest is run
    from tests.imaging import CORPUS, render_document, render_line, same_text
except ImportError:
    from imaging import CORPUS, render_document, render_line, same_text


@pytest.fixture(scope="module")
def adapter():
    ocr = OcrAdapter("ocr", {"pool_size": 2})
    ocr.load()
    yield ocr
    ocr.close()


def _texts(result: OcrResult | ModelError) -> list[str]:
    assert isinstance(result, OcrResult), result
    return [line["text"] for line in result.lines]


def _assert_reads(result: OcrResult | ModelError, expected: tuple[str, ...]) -> None:
    got = _texts(result)
    assert len(got) == len(expected), (got, expected)
    for text, want in zip(got, expected, strict=True):
        assert same_text(text, want), (text, want)


@pytest.mark.parametrize("name", CORPUS.names())
def test_corpus_read_exactly(adapter: OcrAdapter, name: str) -> None:
    item = CORPUS[name]
    [result] = adapter.infer([item.data])
    _assert_reads(result, item.lines)
    for line in result.lines:
        assert 0.5 <= line["score"] <= 1.0
        assert len(line["box"]) == 4
        assert all(isinstance(v, int) for point in line["box"] for v in point)


def test_document_lines_in_reading_order(adapter: OcrAdapter) -> None:
    [result] = adapter.infer([CORPUS["document"].data])
    tops = [min(y for _, y in line["box"]) for line in result.lines]
    assert tops == sorted(tops)


def test_words_on_one_line_read_left_to_right(adapter: OcrAdapter) -> None:
    # Two words far apart on one line become two boxes; left one must come first.
    data = render_document(["左边 " + " " * 30 + " Right"])
    [result] = adapter.infer([data])
    texts = _texts(result)
    assert [t.strip() for t in texts] == ["左边", "Right"]
    assert result.lines[0]["box"][0][0] < result.lines[1]["box"][0][0]


def test_rotated_line_needs_the_direction_classifier(adapter: OcrAdapter) -> None:
    item = CORPUS["rotated_180"]
    no_cls = OcrAdapter("ocr-nocls", {"use_cls": False, "pool_size": 1})
    no_cls.load()
    try:
        [result] = no_cls.infer([item.data])
    finally:
        no_cls.close()
    texts = _texts(result)
    assert isinstance(result, OcrResult)
    assert not (len(texts) == 1 and same_text(texts[0], item.lines[0])), texts
    # ... and it is the classifier that makes the difference: with it, the line reads right.
    [with_cls] = adapter.infer([item.data])
    _assert_reads(with_cls, item.lines)


def test_jpeg_and_grayscale_and_transparent_png(adapter: OcrAdapter) -> None:
    text = "金额 1234.56 元"
    base = Image.open(io.BytesIO(render_line(text)))
    variants = []
    for mode, fmt in (("RGB", "JPEG"), ("L", "PNG"), ("RGB", "BMP"), ("RGB", "WEBP")):
        out = io.BytesIO()
        base.convert(mode).save(out, format=fmt)
        variants.append(out.getvalue())
    # Black text on a fully transparent background: must be composited onto white.
    rgba = base.convert("L").point(lambda v: 255 - v)
    transparent = Image.new("RGBA", base.size, (0, 0, 0, 0))
    transparent.putalpha(rgba)
    out = io.BytesIO()
    transparent.save(out, format="PNG")
    variants.append(out.getvalue())
    for result in adapter.infer(variants):
        _assert_reads(result, (text,))


def test_bad_inputs_fail_alone_and_adapter_keeps_working(adapter: OcrAdapter) -> None:
    png = CORPUS["cjk_invoice"].data
    batch = [b"", b"this is not an image", png[: len(png) // 3], png, b"\xff\xd8\xff" + b"\0" * 9]
    empty, garbage, truncated, good, bad_jpeg = adapter.infer(batch)
    assert isinstance(empty, InvalidInput) and "0 bytes" in str(empty)
    assert isinstance(garbage, InvalidInput)
    assert "could not be decoded" in str(garbage) and "20 bytes" in str(garbage)
    assert isinstance(truncated, InvalidInput) and "PNG" in str(truncated)
    assert "truncated" in str(truncated)
    assert isinstance(bad_jpeg, InvalidInput) and "JPEG" in str(bad_jpeg)
    _assert_reads(good, CORPUS["cjk_invoice"].lines)
    [again] = adapter.infer([png])
    _assert_reads(again, CORPUS["cjk_invoice"].lines)


def test_non_bytes_item_is_invalid_input(adapter: OcrAdapter) -> None:
    [result] = adapter.infer(["a str, not bytes"])  # type: ignore[list-item]
    assert isinstance(result, InvalidInput) and "str" in str(result)


def test_over_pixel_limit_is_resource_limit() -> None:
    small = OcrAdapter("ocr-small", {"max_image_pixels": 10_000, "pool_size": 1})
    small.load()
    try:
        big = render_line("增值税发票")  # a few hundred x 80 px: over 10 000 pixels
        width, height = Image.open(io.BytesIO(big)).size
        [result] = small.infer([big])
        assert isinstance(result, ResourceLimit)
        assert "max_image_pixels=10000" in str(result)
        assert f"{width}x{height}" in str(result)
        tiny = render_line("1", size=12, padding=4)
        [ok] = small.infer([tiny])
        assert isinstance(ok, OcrResult)
    finally:
        small.close()
        small.close()  # idempotent
    assert not small.is_ready()


def test_concurrent_threads_each_get_their_own_answer(adapter: OcrAdapter) -> None:
    jobs = [(f"编号 {n:04d} 金额 {n * 7}.25 元",) for n in range(8)]
    images = [render_line(lines[0]) for lines in jobs]
    barrier = threading.Barrier(len(images))

    def work(i: int) -> OcrResult | ModelError:
        barrier.wait()  # start together so the predictor pool is contended
        results = [adapter.infer([images[i]])[0] for _ in range(2)]
        assert _texts(results[0]) == _texts(results[1])
        return results[0]

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(work, range(len(images))))
    for result, expected in zip(results, jobs, strict=True):
        _assert_reads(result, expected)


def test_one_thread_after_another_keeps_working(adapter: OcrAdapter) -> None:
    # Regression: with oneDNN, a predictor run from a new thread after the loading thread
    # failed with "could not execute a primitive"; gRPC worker threads do exactly that.
    images = [item.data for item in CORPUS]
    errors: list[object] = []

    def work() -> None:
        for result, item in zip(adapter.infer(images), CORPUS, strict=True):
            try:
                _assert_reads(result, item.lines)
            except AssertionError as exc:
                errors.append(exc)

    for _ in range(3):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert errors == []


def test_predictor_pool_runs_and_closes() -> None:
    pool = PredictorPool(_det_model_dir(), RuntimeOptions(cpu_threads=1), size=2)
    try:
        assert pool.size == 2 and pool.input_names() == ["x"]
        x = np.zeros((1, 3, 64, 96), np.float32)
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda _: pool.run([x])[0], range(8)))
        assert all(out.shape == (1, 1, 64, 96) for out in outs)
        with pool.borrow() as predictor:
            assert predictor.input_names == ["x"]
            with pytest.raises(ValueError, match="takes 1 inputs"):
                predictor.run([x, x])
    finally:
        pool.close()
        pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([x])


def test_usage_is_sum_of_text_lengths_and_stages_are_reported(adapter: OcrAdapter) -> None:
    stages: list[tuple[str, dict]] = []

    class _Recorder:  # stands in for the metering core's span factory
        def __init__(self, name: str, attributes: dict) -> None:
            self.name, self.attributes = name, dict(attributes)

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            stages.append((self.name, self.attributes))

        def set_attribute(self, key: str, value: object) -> None:
            self.attributes[key] = value

    set_stage_factory(lambda name, attrs, links: _Recorder(name, attrs))
    usage = RequestUsage()
    try:
        with bind_usage(usage):
            results = adapter.infer([CORPUS["document"].data, b"junk", CORPUS["cjk_invoice"].data])
    finally:
        set_stage_factory(None)
    ok = [r for r in results if isinstance(r, OcrResult)]
    expected = sum(len(line["text"]) for r in ok for line in r.lines)
    assert expected > 0
    assert usage.output_tokens == expected and usage.characters == expected
    assert usage.images == 2 and usage.input_tokens == 0
    assert [name for name, _ in stages] == ["ocr.det", "ocr.cls", "ocr.rec"] * 2
    det = stages[0][1]
    assert det["ocr.boxes"] == 4 and det["ocr.image.width"] > 0
    assert stages[2][1]["ocr.characters"] == sum(len(x["text"]) for x in ok[0].lines)


def test_no_usage_context_is_fine(adapter: OcrAdapter) -> None:
    [result] = adapter.infer([CORPUS["english_invoice"].data])
    assert isinstance(result, OcrResult)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown OCR option.*det_limit"):
        OcrAdapter("ocr", {"det_limit": 960})
    with pytest.raises(ValueError, match="pool_size"):
        OcrAdapter("ocr", {"pool_size": 0})
    with pytest.raises(ValueError, match="device"):
        OcrAdapter("ocr", {"device": "tpu"})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OcrAdapter("ocr", {"det_model_dir": "/nowhere"}).load()
    with pytest.raises(RuntimeError, match="not loaded"):
        OcrAdapter("ocr").infer([b""])


def test_gpu_on_cpu_build_is_a_clear_error() -> None:
    import paddle

    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this paddle build has CUDA")
    with pytest.raises(RuntimeError, match="CPU-only build"):
        PredictorPool(_det_model_dir(), RuntimeOptions(device="gpu:0"))


def _det_model_dir() -> str:
    from models.ocr.adapter import default_model_paths

    return str(default_model_paths()["det_model_dir"])


def test_postprocess_registry_rejects_unknown_names_and_keys() -> None:
    with pytest.raises(ValueError, match="unknown postprocess 'Nope'"):
        build_postprocess({"name": "Nope"})
    with pytest.raises(ValueError, match="does not take option"):
        build_postprocess({"name": "DBPostProcess", "box_threshold": 0.5})
    decode = build_postprocess({"name": "ClsPostProcess"})
    assert decode(np.array([[0.05, 0.95]], np.float32)) == [("180", pytest.approx(0.95))]
