"""Decoding on the device (``--decode device``): the workers send a JPEG's bytes, the model's device decodes
a batch of them (nvJPEG on a GPU) and resizes and crops there, so that the CPUs only read the shards.

The workers still check what they cheaply can (the header's size against the resize limit, the end-of-image
marker of a cut file), and decode with PIL what the device decoder does not take (other formats, CMYK);
an image the device cannot decode is that sample's error, as PIL's is in the reference path.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data import SampleError, check_resize, decode_image

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes the device decoder turns into RGB; the others go through PIL


def device_item(sample: dict, image_keys: Sequence[str], resize: int) -> torch.Tensor:
    """What a worker sends for one sample: a JPEG's bytes as a 1-D uint8 tensor, else the PIL-decoded image as
    uint8 [H, W, 3]. Raises SampleError as `decode_image` does."""
    ext = next((k for k in image_keys if k in sample), None)
    data = sample.get(ext) if ext else None
    if data and data[:2] == b"\xff\xd8":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                head = Image.open(io.BytesIO(data))  # the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SampleError(f"decompression bomb: {e}") from e
        except Exception as e:
            raise SampleError(f"cannot decode .{ext}: {type(e).__name__}: {e}") from e
        if head.format == "JPEG" and head.mode in DEVICE_MODES:
            if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                raise SampleError(f"cannot decode .{ext}: truncated JPEG (no end-of-image marker)")
            check_resize(head, resize)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = decode_image(sample, image_keys)
    check_resize(img, resize)
    return torch.from_numpy(np.array(img))


def decode_batch(items: Sequence[torch.Tensor], crop, device: torch.device
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """``items`` (from `device_item`) as one uint8 [B, 3, size, size] batch on ``device``, through ``crop``
    (`Preprocess.crop`); returns it, the indices it holds, and (index, reason) for those it could not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images: dict[int, torch.Tensor] = {}
    failed: list[tuple[int, str]] = []
    jpegs = [i for i, t in enumerate(items) if t.dim() == 1]
    if jpegs:
        try:
            images.update(zip(jpegs, decode_jpeg([items[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:  # one bad image fails the batched call: decode one by one to find it
            for i in jpegs:
                try:
                    images[i] = decode_jpeg(items[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError as e:
                    failed.append((i, f"cannot decode the JPEG on {device}: {e}"))
    for i, t in enumerate(items):
        if t.dim() == 3:
            images[i] = t.permute(2, 0, 1).to(device, non_blocking=True)
    kept = sorted(images)
    crops = [crop(images[i]) for i in kept]
    return (torch.stack(crops) if crops else None), kept, failed
