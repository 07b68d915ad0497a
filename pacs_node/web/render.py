"""WADO-RS frames, bulkdata, rendered and thumbnail (PS3.18 10.4, 9.5).

These read one verified instance (retrieve/readback.py) with pydicom. Unlike instance
retrieval they hold that one instance's pixel data in memory (a frame of a multi-frame is
sliced out of it), which is what viewers ask them for: one image at a time. Rendering decodes
what pydicom can decode with the installed plugins (numpy for native pixel data, and Pillow,
pylibjpeg or others when present for compressed ones); anything else is answered 406 naming the
transfer syntax. Windowing: `window=center,width[,function]` (PS3.18 8.3.5.1.3), else the
instance's first VOI window, else the full range of the frame.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from pacs_node.index.records import RetrieveItem
from pacs_node.retrieve.readback import Readback
from pacs_node.web.qido import BadQuery
from pacs_node.web.wado import Multipart, NotAcceptable, split_header

THUMBNAIL_SIZE = 128
_IMAGE_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}
_FRAME_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise BadQuery(f"frames: a comma-separated list of frame numbers, not {text!r}") from None
    if not numbers or min(numbers) < 1:
        raise BadQuery("frames: numbers start at 1")
    return numbers


def media_type(accept: str | None, params: Mapping[str, str]) -> str:
    """image/jpeg (the default) or image/png."""
    if not accept:
        return "image/jpeg"
    for media in split_header(accept):
        if media.type in _IMAGE_TYPES:
            return media.type
        if media.type in ("image/*", "*/*"):
            return "image/jpeg"
    raise NotAcceptable(f"Accept {accept!r}: rendered images are image/jpeg or image/png")


def _read(readback: Readback, item: RetrieveItem) -> Dataset:
    with readback.open(item) as copy, open(copy.path, "rb") as f:
        return dcmread(f, force=True)


def _frame_count(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True)
class Frames:
    media_type: str
    body: bytes


def frame_parts(
    readback: Readback, item: RetrieveItem, numbers: list[int], multipart: Multipart
) -> Frames:
    """The frames asked for, as stored: native pixel data sliced by byte range (as
    application/octet-stream), encapsulated frames byte for byte in their image type."""
    ds = _read(readback, item)
    if "PixelData" not in ds:
        raise BadQuery("the instance has no pixel data")
    count = _frame_count(ds)
    if max(numbers) > count:
        raise BadQuery(f"frame {max(numbers)} asked, the instance has {count}")
    syntax = UID(item.transfer_syntax_uid)
    if syntax.is_encapsulated:
        kind = _FRAME_TYPES.get(str(syntax), "application/octet-stream")
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        chosen = [frames[n - 1] for n in numbers]
        content = f"{kind}; transfer-syntax={syntax}"
    else:
        kind = "application/octet-stream"
        size = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.BitsAllocated)
            // 8
        )
        data = ds.PixelData
        chosen = [data[(n - 1) * size : n * size] for n in numbers]
        content = kind
    body = b"".join(
        multipart.part_header(content, len(frame)) + frame + b"\r\n" for frame in chosen
    )
    return Frames(kind, body + multipart.close())


def bulk_value(readback: Readback, item: RetrieveItem, tag: int) -> bytes | None:
    """The value of a top-level binary element, as stored."""
    ds = _read(readback, item)
    if tag not in ds:
        return None
    value = ds[tag].value
    return value if isinstance(value, bytes) else None


def _window(ds: Dataset, text: str | None) -> tuple[float, float] | None:
    if text:
        try:
            center, width = (float(v) for v in text.split(",")[:2])
        except ValueError:
            raise BadQuery("window=center,width[,function]") from None
        return center, max(width, 1.0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(
            center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center
        )
        w = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
    except (TypeError, ValueError):
        return None
    return c, max(w, 1.0)


def render(
    readback: Readback,
    item: RetrieveItem,
    frame: int,
    media: str,
    *,
    thumbnail: bool,
    window: str | None,
) -> bytes:
    import numpy as np
    from PIL import Image

    ds = _read(readback, item)
    if "PixelData" not in ds:
        raise NotAcceptable("the instance has no pixel data to render")
    count = _frame_count(ds)
    if frame > count:
        raise BadQuery(f"frame {frame} asked, the instance has {count}")
    try:
        from pydicom.pixels import pixel_array

        pixels = pixel_array(ds, index=frame - 1 if count > 1 else None)
    except Exception as e:  # no plugin for the syntax, or undecodable data
        syntax = UID(item.transfer_syntax_uid)
        raise NotAcceptable(
            f"cannot render pixel data in {syntax.name} ({syntax}) on this node: "
            f"{type(e).__name__}: {e}; retrieve the instance or its frames instead"
        ) from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    else:
        values = pixels.astype(np.float64)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = values * slope + intercept
        win = _window(ds, window)
        if win is None:
            low, high = float(values.min()), float(values.max())
        else:
            center, width = win
            low, high = center - width / 2, center + width / 2
        scaled = (values - low) / max(high - low, 1e-9) * 255.0
        out = np.clip(scaled, 0, 255).astype(np.uint8)
        if photometric == "MONOCHROME1":
            out = 255 - out
        image = Image.fromarray(out, "L")
    if thumbnail:
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format=_IMAGE_TYPES[media], quality=90)
    return buffer.getvalue()
