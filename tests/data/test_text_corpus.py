"""Byte-level text corpus: default corpus, windows, eval iteration, loading."""

import hashlib
import inspect
import sys
import textwrap

import numpy as np
import pytest

import jaxopt_lab.data.text as text_module
from jaxopt_lab.data import CORPUS_MODULES, TextCorpus, default_corpus_text, load_text, snapshot_corpus_bytes

# SHA-256 of the default corpus's bytes (train then val): the same on every
# Python, because the default is the shipped snapshot (CPython 3.11.7's docs).
DEFAULT_CORPUS_SHA256 = "2d8e960000161a988034229ab37afe11b4f6f7b5b20d8cc1ea6b7d56133f5992"


@pytest.fixture(scope="module")
def corpus():
    return load_text(context=16)


def small_corpus(num_train=40, num_val=30, context=4):
    data = (np.arange(num_train + num_val) * 7 % 251).astype(np.uint8)
    return TextCorpus(train=data[:num_train], val=data[num_train:], context=context, name="toy")


def test_default_corpus_content():
    from pydoc_data.topics import topics

    text = default_corpus_text()
    assert text is default_corpus_text()  # cached
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]])
    # Topics appear in sorted-key order.
    positions = [text.index(topics[k]) for k in keys[:5]]
    assert positions == sorted(positions)
    # Docstrings of listed modules: module, function, and class level.
    assert inspect.cleandoc(textwrap.__doc__) in text
    assert inspect.cleandoc(textwrap.dedent.__doc__) in text
    assert inspect.cleandoc(textwrap.TextWrapper.__doc__) in text
    assert len(CORPUS_MODULES) >= 40 and list(CORPUS_MODULES) == sorted(CORPUS_MODULES)
    assert len(text.encode("utf-8")) > 500_000


def test_missing_module_source_raises(monkeypatch):
    monkeypatch.setattr(text_module, "CORPUS_MODULES", ("textwrap", "sys"))  # sys is built in
    with pytest.raises(FileNotFoundError, match="'sys' has no Python source file"):
        default_corpus_text.__wrapped__()


def test_docstrings_come_from_source_without_importing(tmp_path):
    src = tmp_path / "explosive.py"
    src.write_text(
        '"""Module doc."""\n'
        'raise RuntimeError("importing this module fails")\n'
        "class A:\n"
        '    """Class doc."""\n'
        "    def m(self):\n"
        '        """Method doc."""\n'
        "if True:\n"
        "    def f():\n"
        '        """Guarded doc."""\n'
        "        def inner():\n"
        '            """Inner doc."""\n'
        "try:\n"
        "    pass\n"
        "except Exception:\n"
        "    async def g():\n"
        '        """Handler doc."""\n'
        "x = 1\n"
        '"""Not a docstring."""\n'
    )
    got = text_module.source_docstrings(str(src))
    assert got == ["Module doc.", "Class doc.", "Method doc.", "Guarded doc.", "Inner doc.", "Handler doc."]


def test_default_corpus_is_the_same_on_every_python(corpus):
    data = np.concatenate([corpus.train, corpus.val]).tobytes()
    assert len(data) == 680_486
    assert hashlib.sha256(data).hexdigest() == DEFAULT_CORPUS_SHA256
    assert snapshot_corpus_bytes() is snapshot_corpus_bytes()  # cached
    if sys.version_info[:3] == (3, 11, 7):  # the Python the snapshot was built by
        assert default_corpus_text().encode("utf-8") == data


def test_source_python_builds_from_the_running_python():
    live = load_text(context=16, source="python")
    raw = default_corpus_text().encode("utf-8")
    np.testing.assert_array_equal(np.concatenate([live.train, live.val]), np.frombuffer(raw, np.uint8))
    assert live.name == f"python_docs_{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(ValueError, match="source must be one of 'snapshot', 'python', got 'pypi'"):
        load_text(source="pypi")


def test_damaged_snapshot_is_an_error(monkeypatch):
    monkeypatch.setattr(text_module, "SNAPSHOT_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="has SHA-256 2d8e9600.*expected 0000.*damaged"):
        text_module.snapshot_corpus_bytes.__wrapped__()


def test_load_default_split_is_contiguous_tail(corpus):
    raw = np.frombuffer(snapshot_corpus_bytes(), np.uint8)
    assert corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8
    assert len(corpus.val) == round(0.1 * len(raw))
    np.testing.assert_array_equal(corpus.val, raw[len(raw) - len(corpus.val):])
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), raw)
    assert corpus.name == "python_docs"
    assert (corpus.vocab_size, corpus.num_classes, corpus.task) == (256, 256, "lm")
    assert corpus.input_shape == (16,)


def test_batch_windows_and_shifted_targets(corpus):
    tokens, targets = corpus.batch(step=3, batch_size=8, seed=11)
    assert tokens.shape == targets.shape == (8, 16)
    assert tokens.dtype == np.int32 and targets.dtype == np.int32
    np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
    starts = np.random.default_rng([11, 3]).integers(0, len(corpus.train) - 16, size=8)
    for row, start in enumerate(starts):
        np.testing.assert_array_equal(tokens[row], corpus.train[start:start + 16])
        np.testing.assert_array_equal(targets[row], corpus.train[start + 1:start + 17])


def test_batch_determinism(corpus):
    a = corpus.batch(5, 4, seed=0)
    b = corpus.batch(5, 4, seed=0)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(corpus.batch(5, 4, seed=1)[0], a[0])
    assert not np.array_equal(corpus.batch(6, 4, seed=0)[0], a[0])


def test_batch_reaches_every_valid_start_and_no_further():
    ds = small_corpus(num_train=7, context=4)  # valid starts: 0, 1, 2
    seen = set()
    for step in range(50):
        tokens, targets = ds.batch(step, 4, seed=0)
        for row in range(4):
            start = int(np.flatnonzero(np.all(
                np.lib.stride_tricks.sliding_window_view(ds.train, 4) == tokens[row], axis=1))[0])
            seen.add(start)
            assert targets[row, -1] == ds.train[start + 4]
    assert seen == {0, 1, 2}


def test_eval_batches_non_overlapping_in_order():
    ds = small_corpus(num_train=40, num_val=30, context=4)  # (30 - 1) // 4 = 7 windows
    assert ds.num_eval_windows() == 7
    batches = list(ds.eval_batches(3))
    assert [t.shape for t, _ in batches] == [(3, 4), (3, 4), (1, 4)]
    tokens = np.concatenate([t for t, _ in batches]).ravel()
    targets = np.concatenate([y for _, y in batches]).ravel()
    np.testing.assert_array_equal(tokens, ds.val[:28])
    np.testing.assert_array_equal(targets, ds.val[1:29])
    again = list(ds.eval_batches(3))
    for (t1, y1), (t2, y2) in zip(batches, again):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(y1, y2)
    train = np.concatenate([t for t, _ in ds.eval_batches(100, split="train")]).ravel()
    np.testing.assert_array_equal(train, ds.train[:36])  # (40 - 1) // 4 = 9 windows
    assert len(list(ds.eval_batches(2, max_batches=2))) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(batch_size=1, split="test"), "split must be one of 'train', 'val', got 'test'"),
        (dict(batch_size=1, max_batches=-1), "max_batches must be >= 1, got -1"),
    ],
)
def test_eval_batches_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_corpus().eval_batches(**kwargs)


def test_batch_errors():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        small_corpus().batch(0, 0, 0)
    with pytest.raises(ValueError, match="step must be >= 0, got -2"):
        small_corpus().batch(-2, 1, 0)


def test_user_text_file(tmp_path):
    content = ("hello, world — bytes not chars. " * 20).encode("utf-8")
    path = tmp_path / "my_text.txt"
    path.write_bytes(content)
    ds = load_text(path=str(path), context=8, val_fraction=0.25)
    raw = np.frombuffer(content, np.uint8)
    num_val = round(0.25 * len(raw))
    np.testing.assert_array_equal(ds.train, raw[:-num_val])
    np.testing.assert_array_equal(ds.val, raw[-num_val:])
    assert ds.name == "my_text" and ds.context == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(context=0), "context must be >= 1, got 0"),
        (dict(val_fraction=0.0), r"val_fraction must be in the open interval \(0, 1\), got 0.0"),
        (dict(val_fraction=1.5), "got 1.5"),
    ],
)
def test_load_text_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_text(**kwargs)


def test_load_text_too_short_and_missing(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="100 bytes .* gives 90 train and 10 val bytes; context=64 needs at least 65"):
        load_text(path=str(path))
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        load_text(path=str(tmp_path / "absent.txt"))


def test_text_corpus_construction_checks():
    with pytest.raises(ValueError, match="the val split has 3 bytes; one window of context=4 needs at least 5"):
        TextCorpus(train=np.zeros(10, np.uint8), val=np.zeros(3, np.uint8), context=4, name="x")
    with pytest.raises(ValueError, match="train must be a 1-D uint8"):
        TextCorpus(train=np.zeros(10, np.int32), val=np.zeros(10, np.uint8), context=4, name="x")
