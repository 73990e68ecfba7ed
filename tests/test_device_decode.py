"""`--decode device` (issue 21): JPEGs decoded and cropped on the model's device (here the CPU), batched.

Its rows are timm's forward of torchvision's decode and antialiased resize (a reference loop with no
regcache code), its samples and failures are those of the PIL path, and its features stay close to PIL's.
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import timm
import torch
from conftest import REG, RESIZE, SIZE, config
from PIL import Image

from regcache.extract import extract, extract_many
from regcache.registry import IMAGENET_MEAN, IMAGENET_STD
from regcache.settings import ExtractSettings
from regcache.store import FeatureSet

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work (docs/features.md)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def photo_shards(root) -> tuple[str, dict[str, bytes]]:
    """Two JPEG shards of photo crops, with the odd ones a user's data has: a grey JPEG, a CMYK JPEG, a PNG and a
    JPEG with bytes after its end (decoded by PIL in the workers), a JPEG cut short and one whose data is
    garbage (both refused)."""
    import skimage.data as sk

    rng = np.random.default_rng(0)
    photos = [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket()]
    members: dict[str, tuple[str, bytes]] = {}
    for i in range(10):
        p = photos[i % 4]
        h, w = rng.integers(120, 300, size=2)
        y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
        members[f"photo{i:02d}"] = ("jpg", _jpeg(Image.fromarray(p[y:y + h, x:x + w])))
    base = Image.fromarray(photos[1])
    members["grey"] = ("jpg", _jpeg(base.convert("L")))
    members["cmyk"] = ("jpg", _jpeg(base.convert("CMYK")))
    buf = io.BytesIO()
    base.save(buf, "PNG")
    members["png"] = ("png", buf.getvalue())
    good = _jpeg(base)
    members["trailer"] = ("jpg", good + b"appended by a camera")
    members["cut"] = ("jpg", good[: len(good) // 2])
    sos = good.index(b"\xff\xda") + 14  # a whole header, then noise where the scan's data should be
    members["garbage"] = ("jpg", good[:sos] + bytes(rng.integers(0, 256, 4000, dtype=np.uint8)) + b"\xff\xd9")
    keys = list(members)
    for s, part in enumerate((keys[:8], keys[8:])):  # the second: two photos, then the odd ones
        with tarfile.open(root / f"part-{s:03d}.tar", "w") as tar:
            for k in part:
                ext, data = members[k]
                for name, blob in ((f"{k}.{ext}", data), (f"{k}.cls", str(len(k) % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return str(root / "part-{000..001}.tar"), {k: v for k, (_, v) in members.items()}


def reference_cls(ckpt, images: dict[str, bytes], keys) -> np.ndarray:
    """torchvision's decode (PIL's for what is not a plain JPEG), torch's antialiased bicubic interpolation of
    the shorter side to RESIZE (rounded to uint8 as torchvision does), the center crop, then timm's
    forward_features: [CLS] of each key."""
    from safetensors.torch import load_file
    from torchvision.io import ImageReadMode, decode_jpeg

    model = timm.create_model(REG, pretrained=False, img_size=SIZE, num_classes=0).eval()
    model.load_state_dict(load_file(str(ckpt)))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = []
    for k in keys:
        pil = Image.open(io.BytesIO(images[k]))
        if pil.format == "JPEG" and pil.mode in ("RGB", "L"):
            x = decode_jpeg(torch.frombuffer(bytearray(images[k]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            x = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
        h, w = x.shape[1:]
        size = (RESIZE, int(RESIZE * w / h)) if h <= w else (int(RESIZE * h / w), RESIZE)
        x = torch.nn.functional.interpolate(x[None].float(), size=size, mode="bicubic", antialias=True,
                                            align_corners=False)[0].round().clamp(0, 255)
        top, left = round((size[0] - SIZE) / 2), round((size[1] - SIZE) / 2)
        crops.append((x[:, top:top + SIZE, left:left + SIZE] / 255 - mean) / std)
    with torch.no_grad():
        return model.forward_features(torch.stack(crops))[:, 0].numpy()


def test_decoding_on_the_device_gives_the_reference_rows_and_pils_samples(reg_ckpt, tmp_path):
    data, images = photo_shards(tmp_path)
    pil = FeatureSet(extract(config(REG, reg_ckpt, data, tmp_path / "c", dtype="float32")).path)
    dev = FeatureSet(extract(config(REG, reg_ckpt, data, tmp_path / "c", dtype="float32", decode="device", device="cpu")).path)
    assert dev.fingerprint != pil.fingerprint and "decode" not in pil.identity
    assert dev.identity["decode"] == "device:libjpeg-turbo"  # what decodes on this device: nvjpeg on a GPU
    # the same rows in the same order, the same refusals
    keys = [f"photo{i:02d}" for i in range(10)] + ["grey", "cmyk", "png", "trailer"]
    assert list(dev.index.key) == list(pil.index.key) == keys
    assert sorted(dev.errors.key) == sorted(pil.errors.key) == ["cut", "garbage"]
    why = dict(zip(dev.errors.key, dev.errors.reason))
    assert "truncated" in why["cut"] and "cannot decode the JPEG" in why["garbage"]
    got = dev.load("cls").x
    np.testing.assert_allclose(got, reference_cls(reg_ckpt, images, dev.index.key), rtol=1e-4, atol=1e-4)
    # close to PIL's features, yet not PIL's (the resize differs): cosine similarity per row
    ref = pil.load("cls").x
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(got, ref)


def test_one_pass_feeds_a_pil_model_and_a_device_model_each_its_own_set(reg_ckpt, tmp_path):
    from test_extract import assert_same_content

    data, _ = photo_shards(tmp_path)
    both = [config(REG, reg_ckpt, data, tmp_path / "together", device="cpu"),
            config(REG, reg_ckpt, data, tmp_path / "together", decode="device", device="cpu")]
    together = extract_many(both)
    for s, t in zip(both, together):
        alone = extract(s.model_copy(update={"cache": tmp_path / "alone"}))
        assert t.complete and alone.fingerprint == t.fingerprint
        assert_same_content(alone.path, t.path)
        a, b = FeatureSet(alone.path).errors, FeatureSet(t.path).errors  # each decoder's own verdicts
        assert list(zip(a.key, a.reason)) == list(zip(b.key, b.reason)) and sorted(a.key) == ["cut", "garbage"]


def test_a_device_that_fails_on_good_jpegs_stops_instead_of_recording_them_as_bad(reg_ckpt, tmp_path, monkeypatch):
    """No nvJPEG, out of memory, an unsupported subsampling: the device's fault, not the images'. Alone, the
    extraction fails and commits nothing; in a pass with a PIL model, the PIL model's set is still made."""
    import regcache.extract.device as device
    from regcache.extract.device import DeviceDecodeError

    def broken(*a, **kw):
        raise RuntimeError("nvJPEG is not available")
    monkeypatch.setattr(device, "decode_jpeg", broken)
    data, _ = photo_shards(tmp_path)
    s = config(REG, reg_ckpt, data, tmp_path / "c", decode="device", device="cpu")
    with pytest.raises(DeviceDecodeError, match="photo00 in part-000.tar: cpu could not decode a JPEG that PIL"):
        extract(s)
    (store,) = [p.parent for p in (tmp_path / "c").glob("*/*/regcache.json")]
    assert not FeatureSet(store).committed_units() and not FeatureSet(store).complete
    pil, dev = extract_many([config(REG, reg_ckpt, data, tmp_path / "d", device="cpu"),
                             s.model_copy(update={"cache": tmp_path / "d"})])
    assert pil.complete and len(FeatureSet(pil.path).index) == 14
    assert not dev.complete and "DeviceDecodeError" in dev.error


def test_device_decode_takes_one_view_and_a_named_device():
    """The decoder is in the identity, so the device is named: a dry run on a login node plans what the GPU
    node makes."""
    with pytest.raises(ValueError, match="views 1"):
        ExtractSettings.make(model=REG, data="x.tar", decode="device", views=2, device="cpu")
    with pytest.raises(ValueError, match="--device cuda for nvJPEG, or --device cpu"):
        ExtractSettings.make(model=REG, data="x.tar", decode="device")


def test_a_killed_device_decode_run_leaves_no_workers_and_resumes_to_the_same_set(reg_ckpt, tmp_path):
    """SIGKILL mid-run with two decode workers: the workers exit too (they once hung writing a batch's bytes
    into a pipe nobody read), and the rerun completes to the uninterrupted run's set."""
    import signal
    import subprocess
    import time

    import skimage.data as sk
    from conftest import cli_args, cli_env
    from test_extract import assert_same_content

    from regcache.shards import write_shards

    photo = sk.astronaut()  # photo-sized JPEGs (~100 KB): a batch's bytes are more than a pipe holds
    big = ((f"p{i:03d}", np.roll(photo, 7 * i, axis=1), i % 3) for i in range(96))
    write_shards(big, str(tmp_path / "s" / "p-%03d.tar"), 8, ext="jpg")
    data = str(tmp_path / "s" / "p-{000..011}.tar")
    ref = extract(config(REG, reg_ckpt, data, tmp_path / "ref", decode="device", device="cpu"))
    cache = tmp_path / "c"
    proc = subprocess.Popen(cli_args(reg_ckpt, data, cache, "--decode", "device", "--device", "cpu", "-j", "2",
                                     "-b", "8"), env=cli_env())

    def children() -> set[int]:
        out = set()
        for stat in os.listdir("/proc"):
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if stat.isdigit() and int(fields[1]) == proc.pid:
                out.add(int(stat))
        return out
    workers, deadline = set(), time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*/*/units/*.parquet"))) < 2:
        workers |= children()
        time.sleep(0.02)
    workers |= children()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers, "the run had decode workers"
    deadline = time.time() + 30  # DataLoader workers check on their parent every 5 s
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read()
                                         for w in workers if os.path.exists(f"/proc/{w}")):
        time.sleep(0.5)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")
             and open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"decode workers {alive} outlived their killed parent"
    res = extract(config(REG, reg_ckpt, data, cache, decode="device", device="cpu"))
    assert res.complete and res.units_skipped >= 2 and res.path.name == ref.path.name
    assert_same_content(res.path, ref.path)


def test_out_of_memory_resizing_on_the_device_is_retried_once_then_stops_the_device():
    """Out of memory once: the cache is freed and the image resized again. Twice: the device's limit, not the
    image's fault, so DeviceDecodeError (its models stop) rather than a sample recorded as bad; any other fault
    is raised as it is."""
    from regcache.extract.device import DeviceDecodeError, Encoded, decode_batch
    from regcache.models import Preprocess

    small, large = (_jpeg(Image.new("RGB", (w, 40), "red")) for w in (40, 400))
    pre = Preprocess(size=32, resize=36, decode="device:libjpeg-turbo")
    calls = []

    def flaky(x):
        calls.append(x.shape)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return pre.crop(x)
    images, kept, failed = decode_batch(Encoded.pack([small, large]), flaky, torch.device("cpu"))
    assert images.shape == (2, 3, 32, 32) and kept == [0, 1] and not failed and len(calls) == 3

    def too_large(x):
        if x.shape[2] > 100:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return pre.crop(x)
    with pytest.raises(DeviceDecodeError, match="ran out of memory resizing a 400x40 image") as e:
        decode_batch(Encoded.pack([small, large]), too_large, torch.device("cpu"))
    assert e.value.index == 1

    def broken(x):
        raise RuntimeError("device-side assert triggered")
    with pytest.raises(RuntimeError, match="device-side assert"):
        decode_batch(Encoded.pack([small]), broken, torch.device("cpu"))
