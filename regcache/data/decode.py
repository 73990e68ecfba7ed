"""One sample's image and label, or a SampleError that says why not."""
from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from PIL import Image

from .dataset import Dataset
from .errors import SampleError


# --------------------------------------------------------------------------- decoding

#: what PIL raises on bytes that are not a whole image of a format it reads (its decoders and plugins raise more than
#: OSError): each becomes a SampleError naming the sample
IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError,
                                                 EOFError, struct.error, Image.DecompressionBombError)


def decode_image(sample: dict, image_keys: Sequence[str]) -> Image.Image:
    """The sample's image as RGB; corrupt, empty, odd-mode and decompression-bomb images raise SampleError."""
    ext = next((k for k in image_keys if k in sample), None)
    if ext is None:
        raise SampleError(f"no image (looked for {', '.join(image_keys)}; has {', '.join(_exts(sample))})")
    data = sample[ext]
    if not data:
        raise SampleError(f"zero-length .{ext}")
    with image_errors(ext):
        img = Image.open(io.BytesIO(data))
        img.load()
    # 16-bit and float modes would be clipped to 8 bits by convert(): refuse rather than guess
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
        raise SampleError(f"unsupported image mode {img.mode} (16-bit or float pixels)")
    with image_errors(ext):
        return img.convert("RGB")


@contextmanager
def image_errors(ext: str) -> Iterator[None]:
    """PIL's errors on a sample's bytes (and its decompression-bomb warning) as a SampleError that says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError(f"decompression bomb: {e}") from e
    except IMAGE_ERRORS as e:
        raise SampleError(f"cannot decode .{ext}: {type(e).__name__}: {e}") from e


def check_resize(img: Image.Image, shorter: int | None) -> None:
    """Refuse an image whose resize (shorter side to ``shorter``) would exceed PIL's bomb limit.

    A 1x50000 strip passes PIL's own check yet resizes to 256 x 12.8M pixels (13.8 GB).
    """
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if shorter and limit and shorter * shorter * max(w, h) / max(1, min(w, h)) > limit:
        long_side = round(shorter * max(w, h) / max(1, min(w, h)))
        raise SampleError(f"{w}x{h} image would be resized to {shorter}x{long_side} pixels, over the "
                          f"{limit}-pixel limit (extreme aspect ratio; refused like a decompression bomb)")


def decode_label(sample: dict, ds: Dataset) -> int:
    """Class index, checked against the class list; -1 for unlabelled sets."""
    if ds.label_key is None:
        return -1
    if ds.label_key not in sample:
        raise SampleError(f"no label .{ds.label_key} (has {', '.join(_exts(sample))})")
    raw = sample[ds.label_key]
    try:
        value = json.loads(raw)[ds.label_field] if ds.label_field else raw.decode().strip()
        label = int(value)
        if str(label) != str(value).strip():
            raise ValueError
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, json.JSONDecodeError):
        shown = raw[:40].decode(errors="replace") if isinstance(raw, bytes) else raw
        raise SampleError(f"label {shown!r} is not an integer" +
                          (f" in json field '{ds.label_field}'" if ds.label_field else "")) from None
    if label >= 2 ** 63:
        raise SampleError(f"label {label} does not fit in 64 bits")
    if label < 0 or (ds.classes is not None and label >= len(ds.classes)):
        top = f"0..{len(ds.classes) - 1}" if ds.classes else "0.."
        raise SampleError(f"label {label} outside {top}")
    return label


def _exts(sample: dict) -> list[str]:
    return [k for k in sample if not k.startswith("__")]
