"""Decoding on the device (``--decode device``): the workers send a JPEG's bytes, the model's device decodes
a batch of them (nvJPEG on a GPU) and resizes and crops there, so that the CPUs only read the shards.

The workers check what they cheaply can (the header's size against the resize limit, the mode) and
decode with PIL what the device decoder does not take: other formats, CMYK, and JPEGs that do not end
with their end-of-image marker (cut short, or with bytes appended), so that those get PIL's verdict.
A JPEG the device cannot decode is that sample's error only if PIL fails on it too; otherwise the
device is at fault (no nvJPEG, out of memory, an unsupported subsampling) and its models stop with
`DeviceDecodeError` rather than record good images as bad. The decoder is in the set's identity
(`models.decoder`).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..data import IMAGE_ERRORS, check_resize, decode_image
from ..data.decode import image_errors

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes the device decoder turns into RGB; the others go through PIL


class DeviceDecodeError(RuntimeError):
    """The device failed on an image that PIL decodes and resizes: a fault of the device or its decoder, not the
    data. ``index``: the image's place in its batch."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


@dataclass
class Encoded:
    """A batch's images as the workers send them: one uint8 buffer (one shared-memory block for the batch, not
    one per image, and not pickled through the workers' pipe), and per image its (start, stop, shape):
    shape None for a JPEG's bytes, [H, W, 3] for pixels PIL decoded."""

    blob: torch.Tensor
    spans: list[tuple[int, int, tuple[int, ...] | None]]

    @classmethod
    def pack(cls, items: Sequence[bytes | np.ndarray]) -> "Encoded":
        parts = [np.frombuffer(t, np.uint8) if isinstance(t, bytes) else t.reshape(-1) for t in items]
        stops = np.cumsum([len(x) for x in parts]).tolist()
        spans = [(stop - len(x), stop, None if isinstance(t, bytes) else t.shape)
                 for x, t, stop in zip(parts, items, stops)]
        return cls(torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.uint8)), spans)

    def item(self, i: int) -> torch.Tensor:
        """A JPEG's bytes (1-D), or pixels [H, W, 3]: views into the buffer."""
        start, stop, shape = self.spans[i]
        return self.blob[start:stop] if shape is None else self.blob[start:stop].view(shape)


def device_item(sample: dict, image_keys: Sequence[str], resize: int) -> bytes | np.ndarray:
    """What a worker sends for one sample (batched by `Encoded.pack`): a JPEG's bytes, else the PIL-decoded
    image as uint8 [H, W, 3]. Raises SampleError as `decode_image` does."""
    ext = next((k for k in image_keys if k in sample), None)
    data = sample.get(ext) if ext else None
    if data and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9":
        with image_errors(ext):
            head = Image.open(io.BytesIO(data))  # the header only
        if head.format == "JPEG" and head.mode in DEVICE_MODES:
            check_resize(head, resize)
            return bytes(data)
    img = decode_image(sample, image_keys)
    check_resize(img, resize)
    return np.array(img)


def _decode(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _pil_decodes(data: torch.Tensor) -> bool:
    try:
        Image.open(io.BytesIO(data.numpy().tobytes())).load()
        return True
    except IMAGE_ERRORS:
        return False


def decode_batch(encoded: Encoded, crop, device: torch.device
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """The images of ``encoded`` as one uint8 [B, 3, size, size] batch on ``device``, through ``crop``
    (`Preprocess.crop`); returns it, the indices it holds, and (index, reason) for those it could not decode."""
    images: dict[int, torch.Tensor] = {}
    failed: list[tuple[int, str]] = []
    jpegs = [i for i, span in enumerate(encoded.spans) if span[2] is None]
    if device.type == "cuda":  # nvJPEG writes on its own stream: the memory it is given must be free by then
        torch.cuda.current_stream(device).synchronize()
    if jpegs:
        try:
            decoded = decode_jpeg([encoded.item(i) for i in jpegs], mode=ImageReadMode.RGB, device=device)
            images.update(zip(jpegs, decoded, strict=True))
        except RuntimeError:  # one bad image fails the batched call: decode one by one to find it
            for i in jpegs:
                try:
                    images[i] = _decode(encoded.item(i), device)
                except RuntimeError as e:
                    if _pil_decodes(encoded.item(i)):
                        raise DeviceDecodeError(f"{device} could not decode a JPEG that PIL decodes ({e}); "
                                                "extract with --decode pil", i) from e
                    failed.append((i, f"cannot decode the JPEG: {e}"))
    for i, (_, _, shape) in enumerate(encoded.spans):
        if shape is not None:
            images[i] = encoded.item(i).permute(2, 0, 1)
    kept = sorted(images)
    crops = [_crop(crop, images[i], i, device) for i in kept]
    return (torch.stack(crops) if crops else None), kept, failed


def _crop(crop, image: torch.Tensor, i: int, device: torch.device) -> torch.Tensor:
    """``crop`` on the device; out of memory twice (after freeing the cache) is the device's limit, not the
    image's fault (`check_resize` bounds the output): the device's models stop, nothing is recorded as bad."""
    for _ in range(2):
        try:
            return crop(image.to(device, non_blocking=True))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            error = e
    h, w = image.shape[1:]
    raise DeviceDecodeError(f"{device} ran out of memory resizing a {w}x{h} image ({type(error).__name__}); "
                            "extract with --decode pil, or with fewer models or a smaller batch per pass", i) from error
