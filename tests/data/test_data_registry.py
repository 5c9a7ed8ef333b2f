"""The DATASETS registry the experiment config relies on."""

import inspect

import numpy as np
import pytest

import jaxopt_lab.data as data


def test_registry_names():
    assert set(data.DATASETS) == {"digits", "modular", "text", "least_squares", "logistic", "npz", "tokens", "python_code"}
    assert data.DATASETS["digits"] is data.load_digits
    assert data.DATASETS["modular"] is data.modular_arithmetic
    assert data.DATASETS["text"] is data.load_text
    assert data.DATASETS["least_squares"] is data.least_squares
    assert data.DATASETS["logistic"] is data.logistic_regression


@pytest.mark.parametrize("name", ["digits", "modular", "text", "least_squares", "logistic", "npz", "tokens"])
def test_loader_signatures_are_keyword_args_with_defaults(name):
    params = inspect.signature(data.DATASETS[name]).parameters.values()
    for p in params:
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), (name, p)
        assert p.default is not p.empty, (name, p.name)
        assert not isinstance(p.annotation, str), "annotations must be real objects, not strings"


@pytest.mark.parametrize("name", ["modular", "least_squares", "logistic", "text"])
def test_default_loaders_share_the_batch_interface(name):
    ds = data.DATASETS[name]()
    x1, y1 = ds.batch(step=2, batch_size=5, seed=0)
    x2, y2 = ds.batch(step=2, batch_size=5, seed=0)
    assert len(x1) == len(y1) == 5
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    first = next(iter(ds.eval_batches(4)))
    assert len(first[0]) == 4
    assert ds.task in ("classification", "regression", "lm")


def test_npz_entry_takes_path(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x_train=np.ones((3, 2), np.float32), y_train=np.array([0, 1, 1]),
             x_test=np.ones((1, 2), np.float32), y_test=np.array([0]))
    ds = data.DATASETS["npz"](path=str(path))
    assert ds.num_classes == 2 and ds.name == "x"
