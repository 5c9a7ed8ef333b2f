"""Token files (data.name = "tokens"): windows read from the memmap, seeding, worker shards, checks,
prepare_tokens, and the iterator's position in the trainer's checkpoints.

Most files here hold each token's own position (uint32 ids 0, 1, 2, ...), so a window's first id
is its start and the checks are exact identities against a plain numpy read of the file.
"""

import json
import os
import sys

import numpy as np
import pytest

from jaxopt_lab.data import DATASETS, load_tokens, prepare_tokens

SEQ = 8


def positions(folder, lengths, val=200, dtype="uint32", offset=0):
    """train.bin (or train/ shards of ``lengths``) holding global positions; val.bin of ``val`` tokens
    (from 10**6 for uint32, else from 0)."""
    os.makedirs(folder, exist_ok=True)
    if len(lengths) == 1:
        np.arange(offset, offset + lengths[0], dtype=dtype).tofile(os.path.join(folder, "train.bin"))
    else:
        os.makedirs(os.path.join(folder, "train"), exist_ok=True)
        start = offset
        for i, n in enumerate(lengths):
            np.arange(start, start + n, dtype=dtype).tofile(os.path.join(folder, "train", f"shard_{i:02d}.bin"))
            start += n
    first = 10**6 if dtype == "uint32" else 0
    np.arange(first, first + val, dtype=dtype).tofile(os.path.join(folder, "val.bin"))
    return str(folder)


def load(folder, **kw):
    kw = {"seq_len": SEQ, "dtype": "uint32", "vocab_size": 2 * 10**6, **kw}
    return load_tokens(folder, train="train" if os.path.isdir(os.path.join(folder, "train")) else "train.bin", **kw)


def test_registered_under_tokens():
    assert DATASETS["tokens"] is load_tokens


def test_windows_match_a_numpy_read_of_the_file(tmp_path):
    """One worker: starts are default_rng([seed, 0, step]).integers(0, n - seq_len); the window is the
    file's tokens from there, targets shifted by one."""
    folder = str(tmp_path)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=5000, dtype=np.uint16)
    tokens.tofile(os.path.join(folder, "train.bin"))
    tokens[:300].tofile(os.path.join(folder, "val.bin"))
    data = load_tokens(folder, seq_len=SEQ, dtype="uint16", vocab_size=50257)
    raw = np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16).astype(np.int64)
    for step in (0, 1, 17):
        x, y = data.batch(step, 6, seed=3)
        starts = np.random.default_rng([3, 0, step]).integers(0, raw.size - SEQ, size=6)
        want = np.stack([raw[s:s + SEQ + 1] for s in starts])
        assert x.dtype == y.dtype == np.int32 and x.shape == (6, SEQ)
        np.testing.assert_array_equal(x, want[:, :-1])
        np.testing.assert_array_equal(y, want[:, 1:])
    # evaluation: consecutive non-overlapping windows of val.bin from its start
    val = np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16).astype(np.int64)
    batches = list(data.eval_batches(16))
    xs = np.concatenate([b[0] for b in batches])
    assert xs.shape[0] == data.num_eval_windows() == (300 - 1) // SEQ
    np.testing.assert_array_equal(xs, val[:xs.shape[0] * SEQ].reshape(-1, SEQ))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), val[1:xs.shape[0] * SEQ + 1].reshape(-1, SEQ))
    assert len(list(data.eval_batches(16, max_batches=1))) == 1


def test_shards_windows_stay_inside_one_file(tmp_path):
    lengths = [50, 8, 200, 31]  # a file shorter than a window (8 < SEQ + 1) gives none
    data = load(positions(tmp_path, lengths))
    ends = np.cumsum(lengths)
    seen = set()
    for step in range(200):
        x, y = data.windows(step, 4, seed=0)
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(SEQ))  # contiguous positions
        np.testing.assert_array_equal(y, x + 1)
        last = x[:, -1] + 1  # position of the window's last token (the last target)
        assert (np.searchsorted(ends, x[:, 0], side="right") == np.searchsorted(ends, last, side="right")).all()
        seen.update(x[:, 0].tolist())
    assert not any(42 <= s < 58 for s in seen) and min(seen) >= 0 and max(seen) <= ends[-1] - SEQ - 1
    assert data.num_tokens() == sum(lengths)


def test_iterator_is_the_random_access_dataset_and_deterministic(tmp_path):
    data = load(positions(tmp_path, [4000]))
    a = data.loader(3, seed=5, num_workers=2, prefetch=2)
    got = [next(a) for _ in range(4)]
    assert a.position == 4
    for step, (x, y) in enumerate(got):
        assert x.shape == (2, 3, SEQ)
        np.testing.assert_array_equal(x, a.dataset[step][0])
        for w in range(2):
            np.testing.assert_array_equal(x[w], data.windows(step, 3, 5, worker=w, num_workers=2)[0])
    b = data.loader(3, seed=5, num_workers=2)
    b.seek(2)
    np.testing.assert_array_equal(next(b)[0], got[2][0])
    b.iterator.set_state(a.iterator.get_state())  # what a checkpoint holds
    np.testing.assert_array_equal(next(b)[0], next(a)[0])
    other = data.loader(3, seed=6, num_workers=2)
    assert not np.array_equal(next(other)[0], got[0][0])


def test_workers_read_disjoint_shards_seeded_by_their_index(tmp_path):
    n, W = 4000, 4
    data = load(positions(tmp_path, [n]))
    loader = data.loader(8, seed=0, num_workers=W)
    tokens = [set() for _ in range(W)]
    for _ in range(100):
        x, y = next(loader)
        for w in range(W):
            tokens[w].update(np.concatenate([x[w], y[w]], axis=1).ravel().tolist())
    for w in range(W):  # worker w reads only its contiguous quarter, and most of it
        lo, hi = w * n // W, (w + 1) * n // W
        assert lo <= min(tokens[w]) and max(tokens[w]) < hi and len(tokens[w]) > 0.9 * (hi - lo)
    assert all(not (tokens[i] & tokens[j]) for i in range(W) for j in range(i + 1, W))
    # a process loading workers 1 and 3 only (WorkerRunner.local_workers) gets their rows
    part = data.loader(8, seed=0, num_workers=W, workers=[1, 3])
    full = data.loader(8, seed=0, num_workers=W)
    np.testing.assert_array_equal(next(part)[0], next(full)[0][[1, 3]])
    # without shards every worker draws from the whole file, each with its own stream
    shared = load(str(tmp_path), worker_shards=False)
    x = shared.loader(8, seed=0, num_workers=W).dataset[0][0]
    assert all(not np.array_equal(x[0], x[w]) for w in range(1, W))
    np.testing.assert_array_equal(x[2], shared.windows(0, 8, 0, worker=2, num_workers=W)[0])
    for bad in ([3, 1], [0, 0], [4], []):
        with pytest.raises(ValueError, match="workers must be sorted distinct"):
            data.loader(8, seed=0, num_workers=W, workers=bad)
    with pytest.raises(ValueError, match=r"worker 0's shard of the train split \(tokens 0 to 8 of 32"):
        load(positions(tmp_path / "short", [32])).loader(2, 0, num_workers=4)  # 8 tokens each < SEQ + 1


def test_dtype_and_vocabulary_checks_name_the_problem(tmp_path):
    folder = positions(tmp_path, [1000], dtype="uint16")
    with pytest.raises(ValueError, match=r"dtype must be one of uint16, uint32 .* got 'int16'"):
        load_tokens(folder, dtype="int16", vocab_size=1000)
    np.arange(999, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))  # 1998 bytes
    with pytest.raises(ValueError, match=r"train.bin' has 1998 bytes, not a whole number of uint32 tokens"):
        load_tokens(folder, dtype="uint32", vocab_size=1000)
    with pytest.raises(ValueError, match=r"vocab_size = 70000 does not fit dtype 'uint16'"):
        load_tokens(folder, dtype="uint16", vocab_size=70000)
    with pytest.raises(ValueError, match="no meta.json to say the vocabulary size: set data.vocab_size"):
        load_tokens(folder, dtype="uint16")
    data = load_tokens(folder, dtype="uint16", vocab_size=500, seq_len=SEQ)  # ids up to 998
    with pytest.raises(ValueError, match=r"token id \d+ in .*train.bin \(window at token \d+\) is not below vocab_size = 500"):
        for step in range(50):
            data.batch(step, 8, 0)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"dtype": "uint32", "vocab_size": 1000}, f)
    with pytest.raises(ValueError, match="dtype = 'uint16' but .*meta.json says the files are 'uint32'"):
        load_tokens(folder, dtype="uint16")
    os.remove(os.path.join(folder, "meta.json"))
    with pytest.raises(ValueError, match="needs data.path"):
        load_tokens()
    with pytest.raises(FileNotFoundError, match="token folder not found"):
        load_tokens(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="token file not found: .*valid.bin"):
        load_tokens(folder, dtype="uint16", vocab_size=1000, val="valid.bin")
    with pytest.raises(ValueError, match="the val split's longest file has 200 tokens; one window of seq_len=300"):
        load_tokens(folder, dtype="uint16", vocab_size=1000, seq_len=300)


def test_prepare_tokens_round_trip(tmp_path):
    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    docs = {"a.txt": "alpha beta\n", "b.txt": "gamma", "sub/c.txt": "délta épsilon " * 20, "d.md": "zeta eta theta"}
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / ".hidden" / "x.txt").write_text("never read")
    meta = prepare_tokens(str(src), str(tmp_path / "out"), val_fraction=0.2, seed=3)
    names = sorted(docs)  # the order prepare_tokens shuffles: sorted paths, permuted by the seed
    order = np.random.default_rng(3).permutation(len(names))
    stream = b"".join(docs[names[i]].encode("utf-8") for i in order)
    train = np.fromfile(tmp_path / "out" / "train.bin", np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", np.uint16)
    assert val.size == round(0.2 * len(stream)) and train.size + val.size == len(stream)
    assert np.concatenate([train, val]).astype(np.uint8).tobytes() == stream
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint16" and meta["files"] == 4
    data = load_tokens(str(tmp_path / "out"), seq_len=SEQ)  # vocabulary and dtype from meta.json
    assert data.vocab_size == 256 and data.num_tokens("val") == val.size

    # a tokenizer hook (module:function, the module's vocab_size); the script's command line
    (tmp_path / "my_tokenizer.py").write_text(
        "vocab_size = 70000\ndef encode(text):\n    return [69999 - len(w) for w in text.split()] + [0]\n")
    sys.path.insert(0, str(tmp_path))
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    try:
        import prepare_tokens as script

        assert script.main([str(src), str(tmp_path / "bpe"), "--tokenizer", "my_tokenizer:encode",
                            "--val-fraction", "0", "--pattern", "**/*.txt", "--seed", "1"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    txts = sorted(n for n in docs if n.endswith(".txt"))
    order = np.random.default_rng(1).permutation(len(txts))
    want = [t for i in order for t in [69999 - len(w) for w in docs[txts[i]].split()] + [0]]
    meta = json.loads((tmp_path / "bpe" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70000 and meta["val_tokens"] == 0  # 70000 > 2**16
    np.testing.assert_array_equal(np.fromfile(tmp_path / "bpe" / "train.bin", np.uint32), want)
    with pytest.raises(ValueError, match="does not fit dtype 'uint16'"):
        prepare_tokens(str(src), str(tmp_path / "x"), tokenizer="my_tokenizer:encode", dtype="uint16")
    with pytest.raises(ValueError, match="tokenizer must be 'module:function'"):
        prepare_tokens(str(src), str(tmp_path / "x"), tokenizer="my_tokenizer.encode")


def test_trainer_checkpoints_the_iterator_position(tmp_path):
    """The checkpoint holds the grain iterator's position (one file per process); a resume from an
    earlier checkpoint restores it and redoes the later steps with the same batches."""
    from jaxopt_lab.experiment import config as config_lib
    from jaxopt_lab.experiment import trainer
    from jaxopt_lab.experiment.metrics import read_metrics, without_timing

    folder = tmp_path / "tok"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 256, 3000, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, 256, 300, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 256, "dtype": "uint16"}))
    cfg = config_lib.from_dict({
        "run": {"name": "tok", "seed": 2, "out_dir": str(tmp_path / "runs")},
        "data": {"name": "tokens", "path": str(folder), "seq_len": SEQ},
        "model": {"name": "gpt", "preset": "micro"},
        "method": {"name": "adamw", "learning_rate": 1e-3},  # several workers: test_gpt_small_config, test_kill_resume
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 1},
        "checkpoint": {"every": 2, "keep": 3}, "logging": {"progress": False, "tensorboard": False}})
    result = trainer.run(cfg)
    for step in (2, 4):
        saved = json.loads((tmp_path / "runs" / "tok" / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text())
        assert saved == {"next_index": step}
    before = list(without_timing(read_metrics(result.run_dir)))
    import shutil

    shutil.rmtree(os.path.join(result.run_dir, "checkpoints", "4"))
    trainer.resume(result.run_dir)
    assert list(without_timing(read_metrics(result.run_dir))) == before


def test_trainer_loads_the_runners_local_workers(tmp_path):
    """A runner that names the workers this process loads (WorkerRunner.local_workers, multi-process
    runs) gets a loader of those workers only; without the attribute, all of them."""
    from jaxopt_lab.experiment import config as config_lib
    from jaxopt_lab.experiment.build import build
    from jaxopt_lab.experiment.trainer import Trainer

    folder = positions(tmp_path / "tok", [4000], dtype="uint16")
    cfg = config_lib.from_dict({
        "run": {"name": "tok", "seed": 2, "out_dir": str(tmp_path / "runs")},
        "data": {"name": "tokens", "path": folder, "seq_len": SEQ, "dtype": "uint16", "vocab_size": 4096},
        "model": {"name": "gpt", "preset": "micro"},
        "method": {"name": "diloco", "sync_every": 2, "inner": {"name": "adamw", "learning_rate": 1e-3},
                   "outer": {"name": "sgd", "learning_rate": 0.7}},
        "workers": {"count": 4}, "train": {"steps": 2, "batch_size": 4}, "logging": {"progress": False}})
    exp = build(cfg)
    assert Trainer(exp, str(tmp_path / "a")).loader.workers == (0, 1, 2, 3)

    class Local(type(exp.runner)):  # as a process of a multi-process run sees it (the attribute may be a property)
        local_workers = [1, 3]

    object.__setattr__(exp.runner, "__class__", Local)
    loader = Trainer(exp, str(tmp_path / "b")).loader
    assert loader.workers == (1, 3)
    x, _ = next(loader)
    np.testing.assert_array_equal(x[1], exp.data.windows(0, 4, 2, worker=3, num_workers=4)[0])
