"""ArrayDataset batching, eval iteration, validation, and .npz loading."""

import numpy as np
import pytest

from jaxopt_lab.data import ArrayDataset, load_npz, load_npz_dataset


def make_dataset(num_train=10, num_test=7, dim=3):
    """Example i of each split has x[i] == i everywhere and y[i] == i."""
    x_train = np.repeat(np.arange(num_train, dtype=np.float32)[:, None], dim, axis=1)
    x_test = np.repeat(np.arange(num_test, dtype=np.float32)[:, None], dim, axis=1)
    return ArrayDataset(
        x_train=x_train,
        y_train=np.arange(num_train, dtype=np.int32),
        x_test=x_test,
        y_test=np.arange(num_test, dtype=np.int32),
        num_classes=max(num_train, num_test),
        task="classification",
        name="toy",
    )


def test_properties():
    ds = make_dataset(num_train=10, num_test=7, dim=3)
    assert ds.input_shape == (3,)
    assert ds.num_train == 10
    assert ds.num_test == 7
    assert ds.extras == {}


def test_batch_is_pure_function_of_seed_and_step():
    ds = make_dataset()
    x1, y1 = ds.batch(step=3, batch_size=4, seed=5)
    x2, y2 = ds.batch(step=3, batch_size=4, seed=5)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    # x and y stay aligned: row i of x is example y[i].
    np.testing.assert_array_equal(x1[:, 0], y1.astype(np.float32))
    streams = {tuple(ds.batch(0, 10, seed)[1]) for seed in range(5)}
    assert len(streams) == 5, "different seeds must give different orders"
    assert tuple(ds.batch(0, 10, 0)[1]) != tuple(ds.batch(1, 10, 0)[1])


def test_batch_matches_documented_formula():
    ds = make_dataset(num_train=10)
    seed, step, bs = 7, 5, 4  # positions 20..23 -> epoch 2
    _, y = ds.batch(step, bs, seed)
    perm = np.random.default_rng([seed, 2]).permutation(10)
    np.testing.assert_array_equal(y, perm[0:4])
    _, y = ds.batch(2, bs, seed)  # positions 8..11 straddle epochs 0 and 1
    p0 = np.random.default_rng([seed, 0]).permutation(10)
    p1 = np.random.default_rng([seed, 1]).permutation(10)
    np.testing.assert_array_equal(y, np.concatenate([p0[8:], p1[:2]]))


def test_every_example_once_per_epoch_across_straddling_batches():
    ds = make_dataset(num_train=10)
    stream = np.concatenate([ds.batch(step, 4, seed=3)[1] for step in range(10)])  # 4 epochs
    epochs = stream.reshape(4, 10)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
    assert len({tuple(e) for e in epochs}) == 4, "each epoch must be reshuffled"


def test_batch_larger_than_dataset_spans_several_epochs():
    ds = make_dataset(num_train=10)
    _, y = ds.batch(0, 25, seed=0)  # two full epochs and half of a third
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == 25
    assert counts.min() >= 2 and counts.max() <= 3
    np.testing.assert_array_equal(np.sort(y[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(y[10:20]), np.arange(10))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=0, batch_size=0, seed=0), "batch_size must be >= 1, got 0"),
        (dict(step=-1, batch_size=2, seed=0), "step must be >= 0, got -1"),
        (dict(step=0, batch_size=2, seed=-3), "seed must be >= 0, got -3"),
    ],
)
def test_batch_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset().batch(**kwargs)


def test_eval_batches_cover_split_once_with_ragged_last():
    ds = make_dataset(num_train=10, num_test=7)
    batches = list(ds.eval_batches(3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(7))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), ds.x_test)
    train = list(ds.eval_batches(4, split="train"))
    assert [len(y) for _, y in train] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([y for _, y in train]), np.arange(10))
    exact = list(ds.eval_batches(5, split="train"))
    assert [len(y) for _, y in exact] == [5, 5]


def test_eval_batches_max_batches():
    ds = make_dataset(num_test=7)
    got = list(ds.eval_batches(2, max_batches=2))
    assert len(got) == 2
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), np.arange(4))
    assert len(list(ds.eval_batches(2, max_batches=100))) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(batch_size=2, split="val"), "split must be one of 'train', 'test', got 'val'"),
        (dict(batch_size=2, max_batches=0), "max_batches must be >= 1, got 0"),
    ],
)
def test_eval_batches_errors_raise_on_call(kwargs, match):
    ds = make_dataset()
    with pytest.raises(ValueError, match=match):
        ds.eval_batches(**kwargs)  # no iteration needed


def test_construction_checks():
    ds = make_dataset()
    with pytest.raises(ValueError, match="x_train has 10 examples but y_train has 9"):
        ArrayDataset(ds.x_train, ds.y_train[:9], ds.x_test, ds.y_test, 10, "classification", "bad")
    with pytest.raises(ValueError, match=r"got values from 0 to 9"):
        ArrayDataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test, 5, "classification", "bad")
    with pytest.raises(ValueError, match="num_classes must be None for regression, got 10"):
        ArrayDataset(
            ds.x_train, ds.y_train.astype(np.float32), ds.x_test, ds.y_test.astype(np.float32), 10,
            "regression", "bad",
        )
    with pytest.raises(ValueError, match="'ranking'"):
        ArrayDataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test, 10, "ranking", "bad")
    with pytest.raises(ValueError, match=r"shape \(3,\) but x_test examples have shape \(2,\)"):
        ArrayDataset(ds.x_train, ds.y_train, ds.x_test[:, :2], ds.y_test, 10, "classification", "bad")


def test_npz_round_trip_classification(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.standard_normal((12, 4, 4, 1)).astype(np.float32),
        y_train=np.array([0, 1, 2, 1, 0, 2, 1, 0, 2, 1, 0, 1], dtype=np.int64),
        x_test=rng.standard_normal((5, 4, 4, 1)).astype(np.float32),
        y_test=np.array([4, 0, 1, 2, 0], dtype=np.int64),  # max label only in test
    )
    path = tmp_path / "my_images.npz"
    np.savez(path, **arrays)
    ds = load_npz(str(path))
    assert ds.task == "classification"
    assert ds.num_classes == 5
    assert ds.name == "my_images"
    assert ds.y_train.dtype == np.int32
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(ds, key), value)
    assert load_npz(path, name="other").name == "other"
    assert load_npz_dataset(path=str(path)).num_classes == 5


def test_npz_round_trip_regression(tmp_path):
    arrays = dict(
        x_train=np.ones((6, 2), np.float32), y_train=np.linspace(0, 1, 6),
        x_test=np.zeros((2, 2), np.float32), y_test=np.array([0.5, -1.0]),
    )
    path = tmp_path / "reg.npz"
    np.savez(path, **arrays)
    ds = load_npz(path)
    assert ds.task == "regression"
    assert ds.num_classes is None
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])


def test_npz_errors(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.ones((3, 2)), y_train=np.zeros(3, np.int32), x_test=np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['y_test'\]"):
        load_npz(path)
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, x_train=np.ones((3, 2)), y_train=np.zeros(3, np.int32),
             x_test=np.ones((1, 2)), y_test=np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="got dtypes int32 and float32"):
        load_npz(mixed)
    negative = tmp_path / "neg.npz"
    np.savez(negative, x_train=np.ones((3, 2)), y_train=np.array([0, -2, 1]),
             x_test=np.ones((1, 2)), y_test=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="from -2 to 1"):
        load_npz(negative)
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        load_npz(tmp_path / "nowhere.npz")
    with pytest.raises(ValueError, match="path=None"):
        load_npz_dataset()
