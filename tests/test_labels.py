"""Image-level labels: official int keys and SIPE/CPN str keys map to the same vectors (protocol.md §1.3, §11.1)."""

import numpy as np
import pytest

from lit_wsss.datamodules.labels import decode_int_id, encode_int_id, load_cls_labels, save_cls_labels_npz

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
