"""corrupt: a reproducible blur/dark/noise/JPEG domain shift of an image folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart import load_dataset
from headstart.data.corrupt import corrupt_folder, corrupt_image
from headstart.core.errors import DataError

SETTINGS = {"blur": 1.0, "dark": 0.3, "noise": 0.05, "jpeg": 60}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float64)


def edge_energy(a: np.ndarray) -> float:
    """Variance of neighbouring-pixel differences: high for texture, low for smooth images."""
    return float(np.diff(a, axis=1).var() + np.diff(a, axis=0).var())


def photo(size: int = 64, seed: int = 0) -> Image.Image:
    """Smooth gradients plus fine texture: thousands of colours, real high frequencies."""
    yy, xx = np.mgrid[:size, :size] / size
    a = np.stack([200 * xx, 200 * yy, 120 + 80 * xx * yy], -1) + rng(seed).normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(a + 30, 0, 255).astype(np.uint8))


def make_source(root: Path) -> Path:
    """`train/{a,b}/*` and `val/{a,b}/*` (JPEG, PNG, a grey PNG, a GIF), SOURCE.md, one corrupt file."""
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                photo(seed=10 * c + i + (100 if split == "val" else 0)).save(d / f"{cls}{i}.{'jpg' if i else 'png'}")
    photo(16).convert("L").save(root / "train" / "a" / "grey.png")
    photo(32).convert("P").save(root / "train" / "b" / "anim.gif")
    (root / "SOURCE.md").write_text("# test data\n")
    (root / "train" / "b" / "x.jpg").write_bytes(b"not a jpeg at all" * 20)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(source: Path, out: Path, **kw) -> dict:
    return corrupt_folder(source, out, **{**SETTINGS, "progress": False, "log": lambda _: None, **kw})


@pytest.fixture
def source(tmp_path) -> Path:
    return make_source(tmp_path / "src")


# ---- one image ------------------------------------------------------------------------------

def test_dark_scales_mean_intensity():
    im = photo()
    out = corrupt_image(im, dark=0.4, rng=rng())
    assert pixels(out).mean() / pixels(im).mean() == pytest.approx(0.6, abs=0.02)


def test_blur_removes_high_frequencies():
    im = photo()
    out = corrupt_image(im, blur=2.0, rng=rng())
    assert edge_energy(pixels(out)) < 0.3 * edge_energy(pixels(im))


def test_noise_has_the_requested_std():
    grey = Image.new("RGB", (128, 128), (128, 128, 128))
    out = pixels(corrupt_image(grey, noise=0.05, rng=rng()))
    assert out.std() == pytest.approx(0.05 * 255, rel=0.15)
    assert out.mean() == pytest.approx(128, abs=1)


def test_jpeg_changes_pixels_and_zero_settings_change_nothing():
    im = photo()
    assert not np.array_equal(pixels(corrupt_image(im, jpeg=10, rng=rng())), pixels(im))
    same = corrupt_image(im, rng=rng())
    assert same.mode == "RGB" and np.array_equal(pixels(same), pixels(im))


def test_grey_image_becomes_rgb():
    out = corrupt_image(photo().convert("L"), dark=0.2, rng=rng())
    assert out.mode == "RGB" and out.size == (64, 64)


@pytest.mark.parametrize("bad", [{"blur": -1}, {"dark": 1.0}, {"dark": -0.1}, {"noise": -0.01},
                                 {"jpeg": 0}, {"jpeg": 96}, {"jpeg": 50.0}, {"blur": float("nan")}])
def test_invalid_args_raise_value_error(bad, source, tmp_path):
    with pytest.raises(ValueError):
        corrupt_image(photo(), rng=rng(), **bad)
    with pytest.raises(ValueError):
        run(source, tmp_path / "out", **{**SETTINGS, **bad})
    assert not (tmp_path / "out").exists()


# ---- a folder -------------------------------------------------------------------------------

def test_folder_mirrors_structure_copies_and_skips(source, tmp_path):
    out = tmp_path / "out"
    lines = []
    info = run(source, out, log=lines.append)
    files = set(tree(out))
    for split in ("train", "val"):
        for cls in ("a", "b"):
            assert {f"{split}/{cls}/{cls}{i}.{'jpg' if i else 'png'}" for i in range(3)} <= files
    assert "train/a/grey.png" in files and "train/b/anim.png" in files and "train/b/anim.gif" not in files
    assert "train/b/x.jpg" not in files
    assert (out / "SOURCE.md").read_bytes() == (source / "SOURCE.md").read_bytes()
    assert info["images"] == 14 and info["copied"] == 1
    assert info["skipped"] == [["train/b/x.jpg", info["skipped"][0][1]]]
    assert info["skipped"][0][1].startswith("unreadable")
    assert info["renamed"] == {"train/b/anim.gif": "train/b/anim.png"}
    assert json.loads((out / "CORRUPTION.json").read_text()) == info
    assert info["source"] == str(source.resolve()) and info["seed"] == 0 and info["jpeg"] == 60
    assert info["headstart_version"]
    assert lines == [f"corrupted 14 images -> {out} (skipped 1)"]
    with Image.open(out / "train" / "a" / "a1.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    with Image.open(out / "train" / "a" / "grey.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (16, 16)
    assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"


def test_same_seed_is_byte_identical_and_other_seed_differs(source, tmp_path):
    run(source, tmp_path / "one", seed=3)
    run(source, tmp_path / "two", seed=3)
    run(source, tmp_path / "three", seed=4)
    one, two, three = tree(tmp_path / "one"), tree(tmp_path / "two"), tree(tmp_path / "three")
    assert one == two
    assert one.keys() == three.keys()
    assert one["train/a/a0.png"] != three["train/a/a0.png"]


def test_a_file_does_not_depend_on_the_other_files(source, tmp_path):
    run(source, tmp_path / "before", seed=1)
    photo(seed=99).save(source / "train" / "a" / "a00_new.png")  # sorts before a0.png
    shutil.rmtree(source / "val")
    run(source, tmp_path / "after", seed=1)
    before, after = tree(tmp_path / "before"), tree(tmp_path / "after")
    for name in ("train/a/a0.png", "train/a/a1.jpg", "train/b/b2.jpg", "train/b/anim.png"):
        assert before[name] == after[name], name


def test_existing_output_needs_overwrite(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DataError, match="overwrite"):
        run(source, out)
    assert (out / "keep.txt").read_text() == "old"
    run(source, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "CORRUPTION.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(source, empty)["images"] == 14  # an empty folder is fine without overwrite


def test_refuses_output_inside_source_and_missing_source(source, tmp_path):
    with pytest.raises(DataError, match="inside"):
        run(source, source / "train" / "corrupted")
    with pytest.raises(DataError, match="inside"):
        run(source, source)
    with pytest.raises(DataError):
        run(source, tmp_path, overwrite=True)  # would delete the source with the old output
    with pytest.raises(DataError, match="no such"):
        run(tmp_path / "missing", tmp_path / "out")
    assert (source / "SOURCE.md").exists() and not (source / "train" / "corrupted").exists()


def test_result_loads_with_the_same_classes_and_splits(tiny_image_folder, tmp_path):
    out = tmp_path / "factory"
    info = run(tiny_image_folder, out, blur=1.5, dark=0.4, noise=0.05, jpeg=30)
    assert info["images"] == 48 and len(info["skipped"]) == 1
    clean, dirty = load_dataset(tiny_image_folder), load_dataset(out)
    assert dirty.kind == "image" and dirty.classes == clean.classes
    assert {k: len(v) for k, v in dirty.splits.items()} == {k: len(v) for k, v in clean.splits.items()}
    assert [Path(p).relative_to(out) for p in dirty.split("val").items] == \
        [Path(p).relative_to(tiny_image_folder) for p in clean.split("val").items]
    assert dirty.split("train").labels == clean.split("train").labels
