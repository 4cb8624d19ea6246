"""Data: image folders and text tables as one Dataset; odd files handled, clear one-line errors."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import IMAGE_CLASSES, TEXT_CLASSES, text_rows, write_table

from headstart import load_dataset
from headstart.data import Dataset
from headstart.core.errors import DataError


def per_class(data: Dataset, split: str) -> Counter:
    return Counter(data.classes[y] for y in data.split(split).labels)


def assert_one_line_data_error(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"


# ---- image folders --------------------------------------------------------------------------

@pytest.mark.real
def test_hymenoptera_skips_gif_placeholder_and_keeps_odd_name(data_root):
    data = load_dataset(data_root / "hymenoptera")
    assert data.kind == "image"
    assert data.classes == ["ants", "bees"]
    assert set(data.splits) == {"train", "val"} and data.eval_split == "val"

    skipped = {Path(f).name: reason for f, reason in data.skipped}
    assert "imageNotFound.gif" in skipped, data.skipped
    assert "placeholder" in skipped["imageNotFound.gif"]
    assert data.skipped_summary().get("placeholder or blank image", 0) >= 1
    assert not any(Path(p).name == "imageNotFound.gif" for p in data.split("train").items)

    train_names = [Path(p).name for p in data.split("train").items]
    assert "ant photos.jpg" in train_names  # loaded, not skipped
    assert data.odd_names >= 1
    assert len(data.split("train")) > 200 and len(data.split("val")) > 100


def test_image_folder_skips_corrupt_file_with_reason(tiny_image_folder):
    data = load_dataset(tiny_image_folder)
    assert data.kind == "image" and data.classes == sorted(IMAGE_CLASSES)
    assert len(data.split("train")) == 24 and len(data.split("val")) == 24
    assert [Path(f).name for f, _ in data.skipped] == ["x.jpg"]
    assert data.skipped[0][1].startswith("unreadable")
    assert data.skipped_summary() == {"unreadable": 1}
    names = [Path(p).name for p in data.split("train").items]
    assert "with space.png" in names and "x.jpg" not in names
    assert data.odd_names == 1


def test_image_folder_without_splits_is_split_by_headstart(image_folder_copy, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(image_folder_copy / "train", flat)
    data = load_dataset(flat, seed=3)
    assert set(data.splits) == {"train", "test"}
    assert data.sampling["split_by"] == "headstart"
    assert len(data.split("train")) + len(data.split("test")) == 24
    assert all(n >= 1 for n in per_class(data, "test").values())


# ---- text tables ----------------------------------------------------------------------------

def test_csv_folder_with_train_and_test(tiny_text_csv):
    data = load_dataset(tiny_text_csv)
    assert data.kind == "text" and data.classes == list(TEXT_CLASSES)
    assert len(data.split("train")) == 60 and len(data.split("test")) == 30
    assert data.eval_split == "test"
    assert data.skipped == [] and data.odd_names == 0


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_table_formats_with_custom_columns(tmp_path, suffix):
    rows = text_rows(30, seed=0)
    write_table(tmp_path / f"train{suffix}", rows, columns=("body", "stars"))
    write_table(tmp_path / f"test{suffix}", text_rows(9, seed=1), columns=("body", "stars"))
    data = load_dataset(tmp_path, text_column="body", label_column="stars")
    assert data.classes == list(TEXT_CLASSES)
    assert data.split("train").items == [t for t, _ in rows]
    assert [data.classes[y] for y in data.split("train").labels] == [lab for _, lab in rows]
    if suffix != ".jsonl":  # a table with a header names its columns: a wrong one is a clear error
        with pytest.raises(DataError) as e:
            load_dataset(tmp_path)
        assert_one_line_data_error(e, "text", "--text-column")


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = text_rows(12, seed=0) + [("", "food"), ("no label here", "")]
    write_table(tmp_path / "train.csv", rows)
    (tmp_path / "test.jsonl").write_text('{"text": "goal team ball", "label": "sport"}\nnot json\n')
    data = load_dataset(tmp_path)
    assert len(data.split("train")) == 12 and len(data.split("test")) == 1
    assert data.skipped_summary() == {"empty text": 1, "empty label": 1, "unparseable row": 1}


def test_single_file_is_split_stratified_and_seeded(tmp_path):
    path = write_table(tmp_path / "all.csv", text_rows(60, seed=0))
    a, b, c = (load_dataset(path, seed=s) for s in (0, 0, 1))
    assert set(a.splits) == {"train", "test"} and a.eval_split == "test"
    assert a.sampling == {"split_by": "headstart", "test_fraction": 0.2, "split_seed": 0}
    # stratified: 20% of each class held out
    assert per_class(a, "test") == {c_: 4 for c_ in TEXT_CLASSES}
    assert per_class(a, "train") == {c_: 16 for c_ in TEXT_CLASSES}
    # seeded
    assert a.split("test").items == b.split("test").items
    assert a.split("train").items == b.split("train").items
    assert a.split("test").items != c.split("test").items
    # a partition of the file
    assert sorted(a.split("train").items + a.split("test").items) == sorted(t for t, _ in text_rows(60, seed=0))


# ---- shots ----------------------------------------------------------------------------------

def test_with_shots_keeps_k_per_class_seeded_subset(tiny_text_csv):
    data = load_dataset(tiny_text_csv)
    train = data.split("train")
    pairs = list(zip(train.items, train.labels))
    k3 = data.with_shots(3, seed=1)
    assert per_class(k3, "train") == {c: 3 for c in TEXT_CLASSES}
    assert k3.split("test").items == data.split("test").items  # only train is sampled
    again = data.with_shots(3, seed=1)
    assert again.split("train").items == k3.split("train").items
    other = data.with_shots(3, seed=2)
    assert other.split("train").items != k3.split("train").items
    assert all(p in pairs for p in zip(k3.split("train").items, k3.split("train").labels))
    assert k3.sampling["shots"] == 3 and k3.sampling["shots_seed"] == 1
    assert len(data.split("train")) == 60  # the original is untouched


def test_with_shots_larger_than_class_keeps_all(tiny_text_csv):
    data = load_dataset(tiny_text_csv).with_shots(1000, seed=0)
    assert len(data.split("train")) == 60


def test_with_shots_must_not_be_negative(tiny_text_csv):
    with pytest.raises(DataError):
        load_dataset(tiny_text_csv).with_shots(-1)


def test_zero_shots_keep_the_classes_and_no_examples(tiny_text_csv):
    data = load_dataset(tiny_text_csv)
    zero = data.with_shots(0)
    assert len(zero.split("train")) == 0 and zero.classes == data.classes
    assert len(zero.split("test")) == len(data.split("test"))


# ---- errors ---------------------------------------------------------------------------------

def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "nowhere")
    assert_one_line_data_error(e, "no such file or folder")


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "empty")
    assert_one_line_data_error(e, "no examples")


def test_folder_of_unreadable_files_is_a_data_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "bad" / cls).mkdir(parents=True)
        (tmp_path / "bad" / cls / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "bad")
    assert_one_line_data_error(e, "no examples")


def test_empty_table_is_a_data_error(tmp_path):
    write_table(tmp_path / "train.csv", [])
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_data_error(e, "no examples")


def test_one_class_images_is_a_data_error(tiny_image_folder, tmp_path):
    shutil.copytree(tiny_image_folder / "train" / "red", tmp_path / "one" / "red")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "one")
    assert_one_line_data_error(e, "one class", "red")


def test_one_class_table_is_a_data_error(tmp_path):
    path = write_table(tmp_path / "one.csv", [(f"text {i}", "only") for i in range(10)])
    with pytest.raises(DataError) as e:
        load_dataset(path)
    assert_one_line_data_error(e, "one class")


def test_unknown_split_is_a_data_error(tiny_text_csv):
    with pytest.raises(DataError) as e:
        load_dataset(tiny_text_csv).split("val")
    assert_one_line_data_error(e, "val")


# ---- splits ---------------------------------------------------------------------------------

def test_dev_is_an_alias_of_val(tmp_path):
    write_table(tmp_path / "train.csv", text_rows(30, seed=0))
    write_table(tmp_path / "dev.csv", text_rows(9, seed=1))
    data = load_dataset(tmp_path)
    assert set(data.splits) == {"train", "val"}
    assert data.split("dev") is data.split("val")
    assert data.split("validation") is data.split("val")


def test_eval_split_prefers_test_then_val(tmp_path, tiny_image_folder, tiny_text_csv):
    assert load_dataset(tiny_text_csv).eval_split == "test"
    assert load_dataset(tiny_image_folder).eval_split == "val"
    write_table(tmp_path / "train.csv", text_rows(30, seed=0))
    write_table(tmp_path / "dev.csv", text_rows(9, seed=1))
    assert load_dataset(tmp_path).eval_split == "val"
    write_table(tmp_path / "test.csv", text_rows(9, seed=2))
    assert load_dataset(tmp_path).eval_split == "test"


def _ids(split) -> set:
    return set(split.items)


def test_selection_splits_never_return_the_eval_split(tiny_image_folder, tmp_path):
    # train + val (evaluation on val): selection carves a seeded 10% out of train
    data = load_dataset(tiny_image_folder)
    assert data.eval_split == "val"
    sel_train, sel_val = data.selection_splits(seed=0, mode="holdout")
    eval_items = _ids(data.split("val"))
    assert not (_ids(sel_val) & eval_items) and not (_ids(sel_train) & eval_items)
    assert _ids(sel_train) | _ids(sel_val) == _ids(data.split("train"))
    assert not _ids(sel_train) & _ids(sel_val)
    assert len(sel_val) >= len(data.classes)  # stratified: one per class at least
    assert data.selection_splits(seed=0, mode="holdout")[1].items == sel_val.items
    # auto: a 10% holdout of this tiny train split would be a handful of images -> none, train on all
    auto_train, auto_val = data.selection_splits(seed=0)
    assert auto_val is None and auto_train.items == data.split("train").items
    assert data.selection_splits(seed=0, mode="auto", min_holdout=1)[1].items == sel_val.items
    assert data.selection_splits(seed=0, mode="none")[1] is None

    # train + val + test (evaluation on test): the real val selects
    three = tmp_path / "three"
    shutil.copytree(tiny_image_folder, three)
    shutil.copytree(tiny_image_folder / "val", three / "test")
    for f in (three / "test").rglob("*.png"):
        f.rename(f.with_name("t_" + f.name))
    data3 = load_dataset(three)
    assert data3.eval_split == "test"
    s_train, s_val = data3.selection_splits()
    assert s_val.items == data3.split("val").items
    assert not _ids(s_val) & _ids(data3.split("test"))


# ---- sampling protocols (data/sampling.py) ----------------------------------------------------

def test_sampling_protocols_keep_their_seeded_output():
    """Pinned outputs of the three protocols, computed before they moved to data/sampling.py: benchmark
    figures and shot subsets depend on them bit for bit."""
    import numpy as np

    from headstart.data.sampling import per_class_sample, stratified_indices, stratified_subsample
    from headstart.methods.incontext.method import sample_examples
    from headstart.transfer.scores import stratified_subsample as from_scores

    labels = [i % 3 for i in range(20)] + [0] * 5
    assert per_class_sample(labels, 3, 2, seed=1) == sample_examples(labels, 3, 2, seed=1) == [6, 22, 1, 19, 2, 8]
    assert stratified_indices(labels, 0.2, seed=0)[1] == [3, 8, 19, 22]
    assert stratified_subsample(labels, 10, seed=0, min_per_class=2).tolist() == [2, 4, 6, 7, 10, 12, 14, 15, 20, 22]
    assert from_scores is stratified_subsample
    assert np.bincount(np.array([0] * 90 + [1] * 10)[stratified_subsample([0] * 90 + [1] * 10, 10, seed=0)]).tolist() \
        == [9, 1]


def test_with_shots_is_per_class_sample(tiny_text_csv):
    from headstart.data.sampling import per_class_sample

    data = load_dataset(tiny_text_csv)
    train = data.split("train")
    chosen = per_class_sample(train.labels, len(data.classes), 3, seed=4)
    assert data.with_shots(3, seed=4).split("train").items == [train.items[i] for i in sorted(chosen)]


def test_image_verdicts_are_remembered_until_a_file_changes(image_folder_copy, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    import headstart.data.images as images

    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    first = images.scan_class_folders(image_folder_copy / "train")
    calls = []
    real = images.check_image
    monkeypatch.setattr(images, "check_image", lambda f, skip=True: calls.append(f) or real(f, skip))
    assert images.scan_class_folders(image_folder_copy / "train") == first and not calls, "nothing re-checked"
    changed = image_folder_copy / "train" / "red" / "red_0.png"
    PILImage.new("RGB", (48, 48), "white").save(changed)  # now a blank frame: a placeholder
    paths, _, skipped = images.scan_class_folders(image_folder_copy / "train")
    assert calls == [changed], "only the changed file is checked again"
    assert str(changed) not in paths and any(p == str(changed) for p, _ in skipped)
