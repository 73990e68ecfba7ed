"""Decoding on the device (``--decode device``): the workers send a JPEG's bytes, the model's device decodes
a batch of them (nvJPEG on a GPU) and resizes and crops there, so that the CPUs only read the shards.

The workers check what they cheaply can (the header's size against the resize limit, the mode) and
decode with PIL what the device decoder does not take: other formats, CMYK, and JPEGs that do not end
with their end-of-image marker (cut short, or with bytes appended), so that those get PIL's verdict.
A JPEG the device cannot decode is that sample's error only if PIL fails on it too; otherwise the
device is at fault (no nvJPEG, out of memory, an unsupported subsampling) and the
pass stops with `DeviceDecodeError` rather than record good images as bad.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..data import SampleError, check_resize, decode_image

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes the device decoder turns into RGB; the others go through PIL


class DeviceDecodeError(RuntimeError):
    """The device failed on a JPEG that the CPU decodes: a fault of the device or its decoder, not the data."""


def decoder_name(device: torch.device) -> str:
    """What `decode: device` means on ``device``, for the identity: the decoders give different pixels."""
    return {"cuda": "device:nvjpeg", "cpu": "device:libjpeg-turbo"}.get(device.type, f"device:{device.type}")


def device_item(sample: dict, image_keys: Sequence[str], resize: int) -> bytes | np.ndarray:
    """What a worker sends for one sample: a JPEG's bytes, else the PIL-decoded image as uint8 [H, W, 3]
    (plain Python objects, pickled to the main process, not one shared-memory tensor each).
    Raises SampleError as `decode_image` does."""
    ext = next((k for k in image_keys if k in sample), None)
    data = sample.get(ext) if ext else None
    if data and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                head = Image.open(io.BytesIO(data))  # the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SampleError(f"decompression bomb: {e}") from e
        except Exception as e:
            raise SampleError(f"cannot decode .{ext}: {type(e).__name__}: {e}") from e
        if head.format == "JPEG" and head.mode in DEVICE_MODES:
            check_resize(head, resize)
            return bytes(data)
    img = decode_image(sample, image_keys)
    check_resize(img, resize)
    return np.array(img)


def _decode(data: bytes, device: torch.device) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)


def _pil_decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except Exception:
        return False


def decode_batch(items: Sequence[bytes | np.ndarray], crop, device: torch.device
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """``items`` (from `device_item`) as one uint8 [B, 3, size, size] batch on ``device``, through ``crop``
    (`Preprocess.crop`); returns it, the indices it holds, and (index, reason) for those it could not decode."""
    images: dict[int, torch.Tensor] = {}
    failed: list[tuple[int, str]] = []
    jpegs = [i for i, t in enumerate(items) if isinstance(t, bytes)]
    if device.type == "cuda":  # nvJPEG writes on its own stream: the memory it is given must be free by then
        torch.cuda.current_stream(device).synchronize()
    if jpegs:
        data = [torch.frombuffer(bytearray(items[i]), dtype=torch.uint8) for i in jpegs]
        try:
            images.update(zip(jpegs, decode_jpeg(data, mode=ImageReadMode.RGB, device=device), strict=True))
        except RuntimeError:  # one bad image fails the batched call: decode one by one to find it
            for i in jpegs:
                try:
                    images[i] = _decode(items[i], device)
                except RuntimeError as e:
                    if _pil_decodes(items[i]):
                        raise DeviceDecodeError(f"{device} could not decode a JPEG that PIL decodes ({e}); "
                                                "extract with --decode pil") from e
                    failed.append((i, f"cannot decode the JPEG: {e}"))
    for i, t in enumerate(items):
        if not isinstance(t, bytes):
            images[i] = torch.from_numpy(t).permute(2, 0, 1)
    kept = sorted(images)
    crops = [crop(images[i].to(device, non_blocking=True)) for i in kept]
    return (torch.stack(crops) if crops else None), kept, failed
