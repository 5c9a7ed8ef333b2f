"""Token files at scale: flat memory-mapped token ids (nanoGPT's ``.bin``), read through grain.

A split is a flat binary file of token ids (``uint16`` or ``uint32``, native
little-endian, no header: what nanoGPT's ``prepare.py`` writes with
``np.memmap``), or a folder of such files (shards, read in sorted name order).
Files are memory-mapped, never read whole. ``scripts/prepare_tokens.py`` (the
function :func:`prepare_tokens`) turns a folder of text files into
``train.bin``, ``val.bin`` and a ``meta.json`` that records the vocabulary size
and dtype.

Training batches come from a grain ``MapDataset`` per worker (as MaxText reads
its data with grain): element ``step`` of worker ``w``'s dataset is a batch of
random windows whose starts are drawn by ``np.random.default_rng([seed, w,
step])``, so a batch is a pure function of ``(seed, worker, step)``. With
``worker_shards=True`` (default) worker ``w`` of ``W`` draws only from its own
contiguous ``1/W`` of the training tokens: no token is read by two workers (as
grain shards a source per process in MaxText). A process builds the datasets
of the workers it loads (``workers=``, default all), so each process of a
multi-process run reads only its own shards. The loader's iterator is a grain
``DatasetIterator`` whose position goes into the run's checkpoints (grain's
orbax handler, one file per process) and is restored on resume.

Windows never cross a file boundary: a window is ``seq_len + 1`` consecutive
tokens of one file (the inputs, and the targets shifted by one).
"""

import dataclasses
import glob
import importlib
import json
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxopt_lab.data._checks import check_choice, check_int

TOKEN_DTYPES = ("uint16", "uint32")
META_FILE = "meta.json"
_EXTENSION = ".bin"


def _check_dtype(dtype: str) -> np.dtype:
    if not isinstance(dtype, str) or dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TOKEN_DTYPES)} (the token file's element type), "
                         f"got {dtype!r}")
    return np.dtype(dtype)


def split_files(path: str) -> list[str]:
    """The token files of a split: ``path`` itself (a file), or the sorted ``*.bin`` files of a folder."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*" + _EXTENSION)))
        if not files:
            raise FileNotFoundError(f"the folder {path!r} holds no {_EXTENSION} token files")
        return files
    raise FileNotFoundError(f"token file not found: {path!r} (make one with scripts/prepare_tokens.py)")


def open_tokens(path: str, dtype: str = "uint16") -> np.memmap:
    """One token file, memory-mapped read-only as a 1-D array of ``dtype``.

    A file whose size is not a whole number of ``dtype`` elements is an error
    (a ``uint32`` file read as ``uint16`` is not caught by size alone: ``meta.json``
    records the dtype, and :func:`load_tokens` checks it).
    """
    dt = _check_dtype(dtype)
    size = os.path.getsize(path)
    if size % dt.itemsize:
        raise ValueError(f"token file {path!r} has {size} bytes, not a whole number of {dtype} tokens "
                         f"({dt.itemsize} bytes each): wrong dtype?")
    if size == 0:
        raise ValueError(f"token file {path!r} is empty")
    return np.memmap(path, dtype=dt, mode="r")


def _segments(lengths: Sequence[int], lo: int, hi: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window starts inside global token range ``[lo, hi)`` of files of ``lengths`` (concatenated):
    per file that has any, ``(file, first local start, number of starts)``."""
    files, firsts, counts = [], [], []
    offset = 0
    for i, n in enumerate(lengths):
        a, b = max(lo, offset), min(hi, offset + n)
        count = b - a - seq_len  # a window is seq_len + 1 tokens
        if count > 0:
            files.append(i)
            firsts.append(a - offset)
            counts.append(count)
        offset += n
    return np.asarray(files, np.int64), np.asarray(firsts, np.int64), np.asarray(counts, np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenFiles:
    """Train and validation token files for next-token prediction, memory-mapped.

    Attributes:
      train: the training split's files (1-D memmaps).
      val: the validation split's files.
      seq_len: tokens per example (the model's context).
      vocab_size: number of token ids; every id read is checked to be below it.
      name: a short name for logs.
      worker_shards: whether each of W workers draws only from its own contiguous
        1/W of the training tokens (default) or every worker from all of them.
      train_paths, val_paths: where the files are (for error messages).
    """

    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]
    seq_len: int
    vocab_size: int
    name: str
    worker_shards: bool = True
    train_paths: tuple[str, ...] = ()
    val_paths: tuple[str, ...] = ()

    def __post_init__(self):
        check_int("seq_len", self.seq_len, 1)
        check_int("vocab_size", self.vocab_size, 2)
        for split in ("train", "val"):
            files = getattr(self, split)
            longest = max((f.shape[0] for f in files), default=0)
            if longest < self.seq_len + 1:
                raise ValueError(f"the {split} split's longest file has {longest} tokens; one window of "
                                 f"seq_len={self.seq_len} needs at least {self.seq_len + 1}")

    @property
    def num_classes(self) -> int:
        """Output classes of next-token prediction (= vocab size)."""
        return self.vocab_size

    @property
    def context(self) -> int:
        """The model's context: ``seq_len``."""
        return self.seq_len

    @property
    def task(self) -> str:
        return "lm"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    def num_tokens(self, split: str = "train") -> int:
        return int(sum(f.shape[0] for f in getattr(self, split)))

    # ---- random training windows ------------------------------------------------------

    def worker_starts(self, worker: int = 0, num_workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window starts worker ``worker`` of ``num_workers`` draws from, as segments
        ``(file, first start, count)``: its own 1/W of the training tokens with ``worker_shards``,
        else all of them. An error if the shard holds no whole window."""
        num_workers = check_int("num_workers", num_workers, 1)
        worker = check_int("worker", worker, 0)
        if worker >= num_workers:
            raise ValueError(f"worker must be < num_workers = {num_workers}, got {worker}")
        lengths = [f.shape[0] for f in self.train]
        total = sum(lengths)
        shards = num_workers if self.worker_shards else 1
        w = worker if self.worker_shards else 0
        lo, hi = w * total // shards, (w + 1) * total // shards
        segs = _segments(lengths, lo, hi, self.seq_len)
        if segs[2].sum() == 0:
            raise ValueError(f"worker {worker}'s shard of the train split (tokens {lo} to {hi} of {total}, 1/{shards}) "
                             f"holds no window of seq_len + 1 = {self.seq_len + 1} tokens inside one file: "
                             "use fewer workers, a shorter seq_len, more data, or worker_shards = false")
        return segs

    def _read(self, files: Sequence[np.ndarray], which: np.ndarray, starts: np.ndarray, paths: Sequence[str]):
        seq = np.empty((starts.shape[0], self.seq_len + 1), np.int32)
        for row, (i, s) in enumerate(zip(which, starts)):
            seq[row] = files[i][s:s + self.seq_len + 1]
        top = int(seq.max(initial=0))
        if top >= self.vocab_size:
            row = int(np.argmax(seq.max(axis=1)))
            where = paths[which[row]] if paths else f"file {which[row]}"
            raise ValueError(f"token id {top} in {where} (window at token {int(starts[row])}) is not below "
                             f"vocab_size = {self.vocab_size}: wrong dtype or vocab_size?")
        return seq[:, :-1], seq[:, 1:]

    def windows(self, step: int, batch_size: int, seed: int, worker: int = 0, num_workers: int = 1,
                segments=None) -> tuple[np.ndarray, np.ndarray]:
        """Worker ``worker``'s batch of step ``step``: a pure function of ``(seed, worker, step)``
        (and the shard, from ``num_workers``).

        Window starts are drawn uniformly, with replacement, from the worker's starts
        (:meth:`worker_starts`) by ``np.random.default_rng([seed, worker, step])``.

        Returns:
          ``(tokens, targets)``, int32 ``(batch_size, seq_len)``; ``targets[:, i]`` is the
          token after ``tokens[:, i]``.
        """
        step, batch_size, seed = check_int("step", step, 0), check_int("batch_size", batch_size, 1), check_int("seed", seed, 0)
        files, firsts, counts = self.worker_starts(worker, num_workers) if segments is None else segments
        cum = np.cumsum(counts)
        g = np.random.default_rng([seed, worker, step]).integers(0, cum[-1], size=batch_size)
        seg = np.searchsorted(cum, g, side="right")
        local = firsts[seg] + g - (cum[seg] - counts[seg])
        return self._read(self.train, files[seg], local, self.train_paths)

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Worker 0's batch of one worker (the shared batch interface of the data sets)."""
        return self.windows(step, batch_size, seed)

    def worker_dataset(self, worker: int, num_workers: int, batch_size: int, seed: int):
        """Worker ``worker``'s grain ``MapDataset``: element ``step`` is its batch of that step."""
        import grain

        segments = self.worker_starts(worker, num_workers)  # errors now, not in a prefetch thread
        batch_size, seed = check_int("batch_size", batch_size, 1), check_int("seed", seed, 0)

        def read(step):
            return self.windows(int(step), batch_size, seed, worker, num_workers, segments)

        return grain.MapDataset.range(_ENDLESS).map(read)

    def loader(self, batch_size: int, seed: int, num_workers: int = 1, workers: Sequence[int] | None = None,
               prefetch: int = 2, threads: int = 1) -> "TokenLoader":
        """The training batches of the workers this process loads, as a checkpointable iterator.

        Args:
          batch_size: windows per worker per step.
          seed: the run's seed.
          num_workers: W, all the run's workers (fixes the shards).
          workers: the global indices of the workers whose data this process loads (sorted,
            distinct; default: all W): e.g. ``WorkerRunner.local_workers`` in a multi-process run.
          prefetch: batches read ahead by grain (0: none); threads: grain's reader threads.

        Returns:
          A :class:`TokenLoader`: ``next()`` gives ``(tokens, targets)`` of shape
          ``(len(workers), batch_size, seq_len)``, its ``dataset[step]`` the same at random access.
        """
        import grain

        num_workers = check_int("num_workers", num_workers, 1)
        workers = list(range(num_workers)) if workers is None else [check_int("workers[i]", w, 0) for w in workers]
        if not workers or workers != sorted(set(workers)) or workers[-1] >= num_workers:
            raise ValueError(f"workers must be sorted distinct indices below num_workers = {num_workers}, got {workers}")
        per_worker = [self.worker_dataset(w, num_workers, batch_size, seed) for w in workers]

        def stack(step):
            xs, ys = zip(*(ds[step] for ds in per_worker))
            return np.stack(xs), np.stack(ys)

        dataset = grain.MapDataset.range(_ENDLESS).map(stack)
        options = grain.ReadOptions(num_threads=check_int("threads", threads, 0),
                                    prefetch_buffer_size=check_int("prefetch", prefetch, 0))
        return TokenLoader(dataset, iter(dataset.to_iter_dataset(options)), tuple(workers))

    # ---- evaluation --------------------------------------------------------------------

    def num_eval_windows(self, split: str = "val") -> int:
        """Non-overlapping windows of ``eval_batches``: ``(len(file) - 1) // seq_len`` per file, summed."""
        check_choice("split", split, ("train", "val"))
        return int(sum((f.shape[0] - 1) // self.seq_len for f in getattr(self, split)))

    def eval_batches(self, batch_size: int, split: str = "val", max_batches: int | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive non-overlapping windows from the start of a split (file by file), in order;
        window ``j`` of a file has tokens ``[j*seq_len, (j+1)*seq_len]``. The last batch may be smaller."""
        batch_size = check_int("batch_size", batch_size, 1)
        num = self.num_eval_windows(split)
        if max_batches is not None:
            max_batches = check_int("max_batches", max_batches, 1)
        files = getattr(self, split)
        which = np.concatenate([np.full((f.shape[0] - 1) // self.seq_len, i) for i, f in enumerate(files)])
        starts = np.concatenate([np.arange((f.shape[0] - 1) // self.seq_len) * self.seq_len for f in files])
        paths = getattr(self, f"{split}_paths")
        return self._eval_iter(files, which, starts, paths, num, batch_size, max_batches)

    def _eval_iter(self, files, which, starts, paths, num, batch_size, max_batches):
        num_batches = -(-num // batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for b in range(num_batches):
            sl = slice(b * batch_size, min((b + 1) * batch_size, num))
            yield self._read(files, which[sl], starts[sl], paths)


_ENDLESS = 2**62  # steps a worker's dataset holds: more than any run takes


class TokenLoader:
    """The training batches of a process's workers: a grain iterator and the dataset behind it.

    ``next(loader)`` gives the next step's ``(tokens, targets)``, stacked over the loaded workers;
    ``loader.dataset[step]`` the batch of any step (random access, the same values).
    ``loader.iterator`` is a ``grain.DatasetIterator``: ``get_state()``/``set_state()`` hold its
    position, which the trainer checkpoints with ``grain.checkpoint.CheckpointSave``.
    """

    def __init__(self, dataset, iterator, workers: tuple[int, ...]):
        self.dataset, self.iterator, self.workers = dataset, iterator, workers

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return next(self.iterator)

    @property
    def position(self) -> int:
        """The step whose batch ``next`` gives."""
        return int(self.iterator.get_state()["next_index"])

    def seek(self, step: int) -> None:
        """Make ``next`` give the batch of step ``step``."""
        self.iterator.set_state({"next_index": check_int("step", step, 0)})


def _read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_tokens(path: str | None = None, seq_len: int = 1024, dtype: str | None = None,
                vocab_size: int | None = None, train: str = "train.bin", val: str = "val.bin",
                worker_shards: bool = True) -> TokenFiles:
    """Memory-mapped token files (nanoGPT's ``.bin``: flat ``uint16``/``uint32`` ids).

    Args:
      path: the folder holding the splits (e.g. ``data/openwebtext``).
      seq_len: tokens per example, at least 1.
      dtype: ``"uint16"`` or ``"uint32"``; None takes ``meta.json``'s (``prepare_tokens``
        writes it), else ``"uint16"`` (nanoGPT's). A dtype that differs from ``meta.json``'s is an error.
      vocab_size: number of token ids (50257 for GPT-2's); None takes ``meta.json``'s, and
        without one is an error (every id read is checked against it).
      train, val: each split, relative to ``path``: a ``.bin`` file or a folder of them (shards).
      worker_shards: each of W workers reads only its contiguous 1/W of the training tokens
        (default), or all of them (False; every worker's windows still seeded by its index).

    Returns:
      A :class:`TokenFiles` named after the folder.
    """
    if path is None:
        raise ValueError("the tokens data set needs data.path: a folder with train.bin and val.bin "
                         "(make them with scripts/prepare_tokens.py)")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"token folder not found: {path!r} (make it with scripts/prepare_tokens.py)")
    seq_len = check_int("seq_len", seq_len, 1)
    meta = _read_meta(path)
    if dtype is None:
        dtype = meta.get("dtype", "uint16")
    _check_dtype(dtype)
    if "dtype" in meta and meta["dtype"] != dtype:
        raise ValueError(f"dtype = {dtype!r} but {os.path.join(path, META_FILE)} says the files are {meta['dtype']!r}")
    if vocab_size is None:
        vocab_size = meta.get("vocab_size")
        if vocab_size is None:
            raise ValueError(f"{path!r} has no {META_FILE} to say the vocabulary size: set data.vocab_size "
                             "(50257 for GPT-2's tokenizer)")
    vocab_size = check_int("vocab_size", vocab_size, 2)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"vocab_size = {vocab_size} does not fit dtype {dtype!r} (at most {np.iinfo(dtype).max + 1})")
    if not isinstance(worker_shards, bool):
        raise TypeError(f"worker_shards must be a bool, got {worker_shards!r}")
    splits = {}
    for split, rel in (("train", train), ("val", val)):
        paths = split_files(os.path.join(path, rel))
        splits[split] = (tuple(paths), tuple(open_tokens(p, dtype) for p in paths))
    return TokenFiles(train=splits["train"][1], val=splits["val"][1], seq_len=seq_len, vocab_size=vocab_size,
                      name=os.path.basename(os.path.normpath(path)), worker_shards=worker_shards,
                      train_paths=splits["train"][0], val_paths=splits["val"][0])


# ---- making token files from text --------------------------------------------------------


def byte_tokens(data: bytes) -> np.ndarray:
    """The default tokenizer: one token per byte (ids 0..255)."""
    return np.frombuffer(data, np.uint8)


def load_tokenizer(spec: str) -> tuple[Callable[[str], Sequence[int]], int | None]:
    """``"module:function"`` -> the function and its module's ``vocab_size`` (None if it has none)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"tokenizer must be 'module:function', got {spec!r}")
    module_name, fn_name = spec.split(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"tokenizer {spec!r}: {module_name} has no function {fn_name!r}")
    return fn, getattr(module, "vocab_size", None)


def prepare_tokens(src: str, out: str, val_fraction: float = 0.1, tokenizer: str | None = None,
                   vocab_size: int | None = None, dtype: str | None = None, pattern: str = "**/*",
                   seed: int = 0) -> dict:
    """Turn a folder of text files into ``out/train.bin``, ``out/val.bin`` and ``out/meta.json``.

    The files under ``src`` that match ``pattern`` (sorted, hidden ones skipped) are put in an
    order shuffled by ``seed`` and tokenized one by one into one stream; the last
    ``round(val_fraction * total)`` tokens are the validation split (so both splits take
    whole documents but the one at the cut, from a random sample of the files).

    Args:
      src: folder of text files.
      out: output folder (created).
      val_fraction: in [0, 1).
      tokenizer: None for bytes (one uint16 token per byte, vocabulary 256), or
        ``"module:function"``: ``function(text: str) -> list of ints``, called on each file's
        UTF-8 text (e.g. a module wrapping ``tiktoken.get_encoding("gpt2").encode_ordinary``
        and appending the end-of-text id); its module's ``vocab_size`` is the vocabulary size
        unless ``vocab_size`` is given.
      dtype: ``"uint16"``/``"uint32"``; None picks uint16 if the vocabulary fits, else uint32.

    Returns:
      The metadata written to ``meta.json``.
    """
    from jaxopt_lab.data._checks import check_real

    val_fraction = check_real("val_fraction", val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"text folder not found: {src!r}")
    files = sorted(p for p in glob.glob(os.path.join(src, pattern), recursive=True)
                   if os.path.isfile(p) and not any(part.startswith(".") for part in os.path.relpath(p, src).split(os.sep)))
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r} under {src!r}")
    if tokenizer is None:
        encode, vocab = None, 256
    else:
        encode, vocab = load_tokenizer(tokenizer)
    vocab = vocab_size if vocab_size is not None else vocab
    if vocab is None:
        raise ValueError(f"the tokenizer {tokenizer!r} has no module-level vocab_size: pass vocab_size")
    vocab = check_int("vocab_size", vocab, 2)
    dtype = dtype or ("uint16" if vocab <= 2**16 else "uint32")
    dt = _check_dtype(dtype)
    if vocab > np.iinfo(dt).max + 1:
        raise ValueError(f"vocab_size = {vocab} does not fit dtype {dtype!r}")
    order = np.random.default_rng(seed).permutation(len(files))
    os.makedirs(out, exist_ok=True)
    train_path, val_path = os.path.join(out, "train.bin"), os.path.join(out, "val.bin")
    total = 0
    with open(train_path, "wb") as f:
        for i in order:
            with open(files[i], "rb") as src_f:
                raw = src_f.read()
            if encode is None:
                ids = byte_tokens(raw)
            else:
                ids = np.asarray(encode(raw.decode("utf-8")), np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                    raise ValueError(f"{tokenizer} gave token ids outside [0, {vocab}) for {files[i]!r}")
            ids.astype(dt).tofile(f)
            total += ids.size
    num_val = round(val_fraction * total)
    tokens = np.memmap(train_path, dtype=dt, mode="r") if total else np.zeros(0, dt)
    tokens[total - num_val:].tofile(val_path)
    del tokens
    os.truncate(train_path, (total - num_val) * dt.itemsize)  # the validation tail moves out of train.bin
    meta = {"vocab_size": vocab, "dtype": dtype, "tokenizer": tokenizer or "bytes", "train_tokens": total - num_val,
            "val_tokens": num_val, "files": len(files), "val_fraction": val_fraction, "seed": seed}
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
