import pickle
import tarfile

import numpy as np
import pytest
import torch

from erde.training.data import (
    DataError, augment, batches, channel_stats, load_split, to_tensor, train_val_split,
)
from training_fixtures import make_image_folder


def _write_cifar10(folder, n=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return folder


def test_image_folder_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ERDE_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "ds")
    ds = load_split(root, "train")
    assert ds.images.shape == (120, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.class_names == ("blue", "green", "red") and ds.source == "image-folder"
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    again = load_split(root, "train")  # from the cache
    assert np.array_equal(again.images, ds.images)
    assert len(load_split(root, "test")) == 36


def test_cifar10_folder_and_tarball(tmp_path):
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py")
    train = load_split(folder, "train")
    assert train.images.shape == (100, 32, 32, 3) and train.class_names[0] == "c0"
    assert len(load_split(tmp_path, "test")) == 20  # the parent folder works too
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_tar = load_split(tgz, "train")
    assert np.array_equal(from_tar.images, train.images)
    # pixel layout: the first 1024 bytes are the red plane
    raw = pickle.load(open(folder / "data_batch_1", "rb"))["data"][0]
    assert train.images[0, 0, 1, 0] == raw[1] and train.images[0, 0, 0, 2] == raw[2048]


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n))}
        pickle.dump(d, open(folder / name, "wb"))
    pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, open(folder / "meta", "wb"))
    ds = load_split(folder, "train")
    assert len(ds) == 30 and len(ds.class_names) == 100 and ds.source == "cifar100"


def test_svhn_mat_maps_label_10_to_zero_and_disables_flips(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, 12), dtype=np.uint8), "y": (np.arange(12) % 10 + 1).reshape(-1, 1)})
    ds = load_split(tmp_path, "train")
    assert ds.images.shape == (12, 32, 32, 3) and not ds.flip
    assert ds.labels.max() <= 9 and (ds.labels == 0).any()


def test_malicious_pickle_is_refused(tmp_path):
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pickle.dump(Evil(), open(folder / "data_batch_1", "wb"))
    with pytest.raises(DataError, match="refusing"):
        load_split(folder, "train")


@pytest.mark.parametrize("make", ["missing", "empty", "garbage"])
def test_bad_paths(tmp_path, make):
    path = tmp_path / "data"
    if make == "empty":
        (path / "train" / "a").mkdir(parents=True)
    elif make == "garbage":
        path.mkdir()
        (path / "readme.txt").write_text("hello")
    with pytest.raises(DataError):
        load_split(path, "train")


def test_corrupt_image_names_the_file(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=(2, 1))
    bad = root / "train" / "red" / "0000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="0000.png"):
        load_split(root, "train")


def test_split_is_deterministic_stratified_and_disjoint(tmp_path):
    ds = load_split(make_image_folder(tmp_path / "ds"), "train")
    a_tr, a_val = train_val_split(ds, 0.25)
    b_tr, b_val = train_val_split(ds, 0.25)
    assert np.array_equal(a_val.images, b_val.images) and np.array_equal(a_tr.labels, b_tr.labels)
    assert np.bincount(a_val.labels).tolist() == [10, 10, 10]
    assert len(a_tr) + len(a_val) == len(ds)
    assert len(set(map(bytes, a_tr.images)) & set(map(bytes, a_val.images))) == 0
    assert len(set(a_tr.labels[:6].tolist())) > 1  # shuffled: the first images span classes
    with pytest.raises(DataError):
        train_val_split(ds, 1.5)


def test_batches_and_augment():
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(10)
    mean, std = torch.zeros(3), torch.ones(3)
    eval_batches = list(batches(x, y, 4, mean, std))
    assert [len(b[1]) for b in eval_batches] == [4, 4, 2]
    torch.testing.assert_close(eval_batches[0][0], x[:4].float() / 255)
    g = torch.Generator().manual_seed(0)
    train_batches = list(batches(x, y, 4, mean, std, g, train=True))
    assert [len(b[1]) for b in train_batches] == [4, 4]  # last partial batch dropped
    ranks = [list(batches(x, y, 2, mean, std, torch.Generator().manual_seed(0), train=True, rank=r, world_size=2))
             for r in (0, 1)]
    seen = torch.cat([b[1] for r in ranks for b in r])
    assert len(seen) == 8 and len(set(seen.tolist())) == 8
    img = torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32)
    out = augment(img.repeat(50, 1, 1, 1), flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (50, 3, 32, 32)
    assert not all(torch.equal(o, out[0]) for o in out)


def test_channel_stats(tmp_path):
    ds = load_split(make_image_folder(tmp_path / "ds"), "train")
    mean, std = channel_stats(ds)
    assert len(mean) == 3 and all(0 < m < 1 for m in mean) and all(s > 0 for s in std)
    x, y = to_tensor(ds)
    assert x.shape == (120, 3, 32, 32) and y.dtype == torch.int64
