"""Image-level labels: official int keys and SIPE/CPN str keys map to the same vectors (protocol.md §1.3, §11.1)."""

import numpy as np
import pytest

from lit_wsss.datamodules.labels import VOC_CLASSES, decode_int_id, encode_int_id, load_cls_labels, save_cls_labels_npz

# images per class over train_aug ∪ val, protocol.md §1.3
OFFICIAL_COLUMN_SUMS = [680, 583, 808, 540, 810, 467, 1277, 1124, 1351, 338, 688, 1316, 524, 568, 4600, 607, 357,
                        739, 587, 641]


def test_int_id_round_trip():
    assert decode_int_id(2007000032) == "2007_000032"
    assert encode_int_id("2011_003276") == 2011003276
    with pytest.raises(ValueError, match="YYYY_NNNNNN"):
        decode_int_id(12345)


def test_both_key_formats_and_our_npz_give_the_same_labels(tmp_path):
    vectors = {"2007_000032": [1, 0, 0], "2010_005582": [0, 1, 1]}
    int_keys = {encode_int_id(k): np.array(v, np.float32) for k, v in vectors.items()}
    str_keys = {k: np.array(v, np.float32) for k, v in vectors.items()}
    np.save(tmp_path / "int.npy", int_keys)
    np.save(tmp_path / "str.npy", str_keys)
    from_int = load_cls_labels(tmp_path / "int.npy", num_classes=3)
    from_str = load_cls_labels(tmp_path / "str.npy", num_classes=3)
    assert from_int.keys() == from_str.keys() == vectors.keys()
    for key in vectors:
        assert np.array_equal(from_int[key], from_str[key]) and from_int[key].dtype == np.float32
    save_cls_labels_npz(from_int, tmp_path / "ours.npz")
    ours = load_cls_labels(tmp_path / "ours.npz", num_classes=3)
    assert all(np.array_equal(ours[k], from_int[k]) for k in vectors)


def test_bad_label_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_cls_labels(tmp_path / "missing.npy")
    np.save(tmp_path / "array.npy", np.zeros((3, 20)))
    with pytest.raises(ValueError, match="array.npy"):
        load_cls_labels(tmp_path / "array.npy")
    np.save(tmp_path / "short.npy", {"2007_000032": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="expected 20"):
        load_cls_labels(tmp_path / "short.npy", num_classes=20)


def test_official_irn_file(shared_data):
    labels = load_cls_labels(shared_data / "voc12" / "cls_labels.npy", num_classes=20)
    assert len(labels) == 12031
    assert np.stack(list(labels.values())).sum(0).astype(int).tolist() == OFFICIAL_COLUMN_SUMS
    for split in ("train_aug", "val"):
        ids = (shared_data / "voc12" / f"{split}.txt").read_text().split()
        assert all(i in labels for i in ids)


CLASSES = ("cat", "dining table", "person")


def test_json_and_csv_labels_by_name_and_index(tmp_path):
    (tmp_path / "labels.json").write_text('{"a": ["cat", "person"], "b": [1], "c": []}')
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,cat; person\nb.png,dining table\nc.jpg,\n")
    expected = {"a": [1, 0, 1], "b": [0, 1, 0], "c": [0, 0, 0]}
    for name in ("labels.json", "labels.csv"):
        labels = load_cls_labels(tmp_path / name, class_names=CLASSES)
        assert {k: v.tolist() for k, v in labels.items()} == expected, name
        assert all(v.dtype == np.float32 for v in labels.values())


def test_json_round_trip_and_bad_text_files(tmp_path):
    from lit_wsss.datamodules.labels import save_labels_json

    labels = {"x": np.array([0, 1, 1], np.float32), "y": np.zeros(3, np.float32)}
    save_labels_json(labels, tmp_path / "out.json", CLASSES)
    assert '"x": [\n"dining table",\n"person"\n]' in (tmp_path / "out.json").read_text()
    again = load_cls_labels(tmp_path / "out.json", class_names=CLASSES)
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in labels.items()}
    (tmp_path / "unknown.json").write_text('{"a": ["dog"]}')
    with pytest.raises(ValueError, match=r"unknown.json: image 'a': unknown class 'dog'"):
        load_cls_labels(tmp_path / "unknown.json", class_names=CLASSES)
    (tmp_path / "noheader.csv").write_text("a.jpg,cat\n")
    with pytest.raises(ValueError, match="noheader.csv: expected a header"):
        load_cls_labels(tmp_path / "noheader.csv", class_names=CLASSES)
    (tmp_path / "twice.csv").write_text("image,labels\na.jpg,cat\na.png,person\n")
    with pytest.raises(ValueError, match="twice.csv: line 3 repeats image 'a'"):
        load_cls_labels(tmp_path / "twice.csv", class_names=CLASSES)
    (tmp_path / "names.json").write_text('{"a": ["cat"]}')
    with pytest.raises(ValueError, match="needs the class list"):
        load_cls_labels(tmp_path / "names.json")
    (tmp_path / "index.json").write_text('{"a": [3]}')
    with pytest.raises(ValueError, match="index 3 outside 0..2"):
        load_cls_labels(tmp_path / "index.json", num_classes=3)
    (tmp_path / "labels.txt").write_text("")
    with pytest.raises(ValueError, match="unknown label format '.txt'"):
        load_cls_labels(tmp_path / "labels.txt")


def test_class_list(tmp_path):
    from lit_wsss.datamodules.labels import read_class_list

    (tmp_path / "classes.txt").write_text("background\ncat\n\ndog\n")
    assert read_class_list(tmp_path / "classes.txt") == ("cat", "dog")
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    with pytest.raises(ValueError, match=r"twice.txt repeats \['cat'\]"):
        read_class_list(tmp_path / "twice.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_class_list(tmp_path / "nope.txt")


def test_prepare_labels_converts_the_pickle_once(tmp_path):
    from lit_wsss.cli import main

    vectors = {2007000032: np.eye(20, dtype=np.float32)[3] + np.eye(20, dtype=np.float32)[14]}
    np.save(tmp_path / "cls_labels.npy", vectors)
    with pytest.raises(SystemExit) as done:
        main(["prepare", "labels", "--from", str(tmp_path / "cls_labels.npy"), "--out", str(tmp_path / "l.json")])
    assert done.value.code == 0
    import json

    assert json.loads((tmp_path / "l.json").read_text()) == {"2007_000032": ["boat", "person"]}
    with pytest.raises(SystemExit) as failed:
        main(["prepare", "labels", "--from", str(tmp_path / "none.npy"), "--out", str(tmp_path / "x.json")])
    assert failed.value.code == 1 and not (tmp_path / "x.json").exists()


def test_official_file_converted_to_json_is_the_same(shared_data, tmp_path):
    from lit_wsss.prepare import prepare_labels

    assert prepare_labels(shared_data / "voc12" / "cls_labels.npy", tmp_path / "cls_labels.json") == 12031
    ours = load_cls_labels(tmp_path / "cls_labels.json", class_names=VOC_CLASSES)
    official = load_cls_labels(shared_data / "voc12" / "cls_labels.npy", num_classes=20)
    assert ours.keys() == official.keys()
    assert all(np.array_equal(ours[k], official[k]) for k in official)
