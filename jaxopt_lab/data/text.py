"""Byte-level language-model corpus: Python's own documentation by default.

The default corpus is a fixed snapshot of that documentation, shipped with
the package (``corpus/python_docs_3.11.7.txt.gz``), so every Python version
trains on the same bytes; ``source="python"`` builds it from the running
Python instead (680,486 bytes on 3.11, 710,675 on 3.12, 738,437 on 3.13).
"""

import ast
import dataclasses
import functools
import gzip
import hashlib
import importlib.resources
import importlib.util
import os
import sys
import tokenize
from collections.abc import Iterator

import numpy as np

from jaxopt_lab.data._checks import check_choice, check_fraction, check_int

# Pure-Python standard-library modules whose docstrings join the default
# corpus (sorted; each must have a .py source file, or corpus building fails).
CORPUS_MODULES = (
    "base64", "bdb", "bisect", "calendar", "cmd", "code", "codeop", "colorsys",
    "contextlib", "copy", "difflib", "fileinput", "fnmatch", "fractions", "getopt",
    "gettext", "graphlib", "heapq", "hmac", "ipaddress", "json", "keyword",
    "linecache", "mimetypes", "numbers", "pprint", "py_compile", "queue", "re",
    "sched", "secrets", "shelve", "shlex", "statistics", "string", "textwrap",
    "timeit", "traceback", "uuid", "wave",
)  # fmt: skip

TEXT_SPLITS = ("train", "val")
TEXT_SOURCES = ("snapshot", "python")

# The shipped snapshot: ``default_corpus_text()`` as built by CPython 3.11.7,
# UTF-8, gzip-compressed. See jaxopt_lab/data/corpus/NOTICE.md (origin, license).
SNAPSHOT_FILE = "python_docs_3.11.7.txt.gz"
SNAPSHOT_SHA256 = "2d8e960000161a988034229ab37afe11b4f6f7b5b20d8cc1ea6b7d56133f5992"
SNAPSHOT_BYTES = 680_486
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_source_path(name: str) -> str:
    """Path of a module's ``.py`` source, found without importing the module.

    Args:
      name: a top-level module name.

    Returns:
      The source file path; raises ``FileNotFoundError`` if there is none.
    """
    spec = importlib.util.find_spec(name)
    origin = None if spec is None else spec.origin
    if origin is None or not origin.endswith(".py") or not os.path.isfile(origin):
        raise FileNotFoundError(
            f"corpus module {name!r} has no Python source file (spec origin: {origin!r})"
        )
    return origin


def _collect_docstrings(node: ast.AST, out: list[str]) -> None:
    """Appends the docstrings of ``node`` and every def/class nested in its body."""
    doc = ast.get_docstring(node)
    if doc:
        out.append(doc)
    _collect_from_statements(node.body, out)


def _collect_from_statements(statements: list[ast.stmt], out: list[str]) -> None:
    # Defs can sit inside if/try/with/for/while/match blocks; walking only
    # statement bodies (never expressions) is far cheaper than ast.walk.
    for stmt in statements:
        if isinstance(stmt, _DEFS):
            _collect_docstrings(stmt, out)
            continue
        for field in ("body", "orelse", "finalbody"):
            block = getattr(stmt, field, None)
            if isinstance(block, list):
                _collect_from_statements(block, out)
        for part in [*getattr(stmt, "handlers", ()), *getattr(stmt, "cases", ())]:
            _collect_from_statements(part.body, out)


def source_docstrings(path: str) -> list[str]:
    """Module, class and function docstrings of a Python source file, via ``ast``.

    Args:
      path: a ``.py`` file (it is parsed, never imported).

    Returns:
      The docstrings in source order (outer before nested), cleaned by
      ``ast.get_docstring``.
    """
    with tokenize.open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    out: list[str] = []
    _collect_docstrings(tree, out)
    return out


@functools.lru_cache(maxsize=1)
def default_corpus_text() -> str:
    """The corpus built from the documentation that ships with the running Python.

    All ``pydoc_data.topics.topics`` entries in sorted-key order, then the
    docstrings of every module in ``CORPUS_MODULES`` (in that sorted order),
    read from their source files with ``ast``. Pieces are separated by blank
    lines. Deterministic for a given Python installation, but different
    between Python versions: ``load_text`` uses the shipped snapshot of it
    (``snapshot_corpus_bytes()``) unless asked for ``source="python"``.

    Returns:
      The corpus as one string.
    """
    from pydoc_data.topics import topics

    pieces = [topics[key] for key in sorted(topics)]
    for name in CORPUS_MODULES:
        pieces.extend(source_docstrings(module_source_path(name)))
    return "\n\n".join(pieces)


@functools.lru_cache(maxsize=1)
def snapshot_corpus_bytes() -> bytes:
    """The shipped corpus snapshot: the same bytes on every Python version.

    ``default_corpus_text()`` as CPython 3.11.7 builds it, UTF-8 encoded,
    read from the package data file ``corpus/SNAPSHOT_FILE`` and checked
    against ``SNAPSHOT_SHA256``.

    Returns:
      The corpus bytes (``SNAPSHOT_BYTES`` of them).
    """
    resource = importlib.resources.files("jaxopt_lab.data").joinpath("corpus", SNAPSHOT_FILE)
    try:
        raw = gzip.decompress(resource.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the corpus snapshot {SNAPSHOT_FILE!r} is missing from the installed package "
            f"(expected at {resource}); reinstall jaxopt_lab, or use source='python'"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SNAPSHOT_SHA256:
        raise ValueError(
            f"the corpus snapshot {SNAPSHOT_FILE!r} has SHA-256 {digest}, expected {SNAPSHOT_SHA256}; "
            "the file is damaged"
        )
    return raw


@dataclasses.dataclass(frozen=True, eq=False)
class TextCorpus:
    """A byte-level corpus split into contiguous train and validation bytes.

    Attributes:
      train: uint8 training bytes.
      val: uint8 validation bytes.
      context: window length (tokens per example).
      name: a short name for logs and run directories.
    """

    train: np.ndarray
    val: np.ndarray
    context: int
    name: str

    def __post_init__(self):
        check_int("context", self.context, 1)
        for split in TEXT_SPLITS:
            data = getattr(self, split)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
                raise ValueError(
                    f"{split} must be a 1-D uint8 numpy array, got "
                    f"{getattr(data, 'shape', None)} {getattr(data, 'dtype', type(data).__name__)}"
                )
            if data.shape[0] < self.context + 1:
                raise ValueError(
                    f"the {split} split has {data.shape[0]} bytes; one window of context="
                    f"{self.context} needs at least {self.context + 1}"
                )

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens: one per byte value."""
        return 256

    @property
    def num_classes(self) -> int:
        """Number of output classes of the next-byte prediction (= vocab size)."""
        return 256

    @property
    def task(self) -> str:
        """The task kind, ``"lm"`` (next-token prediction)."""
        return "lm"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example: ``(context,)`` token ids."""
        return (self.context,)

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Random training windows for ``step``: a pure function of ``(seed, step)``.

        Window starts are drawn uniformly (with replacement) from every start
        ``s`` with ``s + context + 1 <= len(train)``, using
        ``np.random.default_rng([seed, step])``.

        Args:
          step: non-negative batch number.
          batch_size: windows per batch, at least 1.
          seed: non-negative seed.

        Returns:
          ``(tokens, targets)``, int32 of shape ``(batch_size, context)``, with
          ``targets[:, i] == train[start + i + 1]``, the byte after ``tokens[:, i]``.
        """
        step = check_int("step", step, 0)
        batch_size = check_int("batch_size", batch_size, 1)
        seed = check_int("seed", seed, 0)
        num_starts = self.train.shape[0] - self.context
        starts = np.random.default_rng([seed, step]).integers(0, num_starts, size=batch_size)
        return self._windows(self.train, starts)

    def _windows(self, data: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = starts[:, None] + np.arange(self.context + 1)[None, :]
        seq = data[idx].astype(np.int32)
        return seq[:, :-1], seq[:, 1:]

    def num_eval_windows(self, split: str = "val") -> int:
        """Number of non-overlapping windows that ``eval_batches`` walks over.

        Args:
          split: ``"train"`` or ``"val"``.

        Returns:
          ``(len(split) - 1) // context``; the trailing bytes that do not fill a
          window are not evaluated.
        """
        check_choice("split", split, TEXT_SPLITS)
        return (getattr(self, split).shape[0] - 1) // self.context

    def eval_batches(
        self, batch_size: int, split: str = "val", max_batches: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive non-overlapping windows from the start of a split, in order.

        Window ``w`` has tokens ``data[w*context : (w+1)*context]`` and targets
        shifted by one byte. No randomness; the last batch may be smaller.

        Args:
          batch_size: windows per batch, at least 1.
          split: ``"train"`` or ``"val"``.
          max_batches: stop after this many batches (at least 1), or None for
            every window.

        Returns:
          An iterator of int32 ``(tokens, targets)`` pairs. Arguments are
          checked on the call, not on the first ``next``.
        """
        batch_size = check_int("batch_size", batch_size, 1)
        num_windows = self.num_eval_windows(split)
        if max_batches is not None:
            max_batches = check_int("max_batches", max_batches, 1)
        return self._eval_iter(getattr(self, split), num_windows, batch_size, max_batches)

    def _eval_iter(self, data, num_windows, batch_size, max_batches):
        num_batches = -(-num_windows // batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for b in range(num_batches):
            first = b * batch_size
            windows = np.arange(first, min(first + batch_size, num_windows))
            yield self._windows(data, windows * self.context)


def load_text(
    path: str | None = None, context: int = 64, val_fraction: float = 0.1, source: str = "snapshot"
) -> TextCorpus:
    """A byte-level corpus: Python's docs (a shipped snapshot), or a user's file.

    Args:
      path: optional text file; its raw bytes are the corpus (``source`` is
        then ignored). None uses Python's documentation, as ``source`` says.
      context: window length, at least 1.
      val_fraction: fraction of the bytes, taken from the END of the corpus
        as one contiguous block, used for validation; in (0, 1). The split
        point is ``len - round(val_fraction * len)``.
      source: where Python's documentation comes from when ``path`` is None:
        ``"snapshot"`` (default) is the copy shipped with the package
        (``snapshot_corpus_bytes()``, built by CPython 3.11.7), the same
        bytes on every Python, so figures reproduce anywhere; ``"python"``
        builds it from the running Python (``default_corpus_text()``), whose
        size and content change with the Python version.

    Returns:
      A ``TextCorpus`` named ``"python_docs"`` (the snapshot),
      ``"python_docs_X.Y"`` (built from Python X.Y) or after the file.
    """
    context = check_int("context", context, 1)
    val_fraction = check_fraction("val_fraction", val_fraction)
    check_choice("source", source, TEXT_SOURCES)
    if path is None and source == "snapshot":
        raw = snapshot_corpus_bytes()
        name = "python_docs"
    elif path is None:
        raw = default_corpus_text().encode("utf-8")
        name = f"python_docs_{sys.version_info.major}.{sys.version_info.minor}"
    else:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file not found: {path!r}")
        with open(path, "rb") as f:
            raw = f.read()
        name = os.path.splitext(os.path.basename(path))[0]
    data = np.frombuffer(raw, dtype=np.uint8)
    num_val = round(val_fraction * data.shape[0])
    num_train = data.shape[0] - num_val
    if min(num_train, num_val) < context + 1:
        raise ValueError(
            f"corpus of {data.shape[0]} bytes with val_fraction={val_fraction} gives {num_train} "
            f"train and {num_val} val bytes; context={context} needs at least {context + 1} in each"
        )
    return TextCorpus(train=data[:num_train], val=data[num_train:], context=context, name=name)


# The fine-tuning domain of the byte-level GPT: Python source code (the pretraining corpus is
# English documentation). Built from the running Python's standard library, so it differs
# between Python versions; ``python_code_bytes`` records what it gives.
CODE_MAX_BYTES = 1_000_000


def python_code_bytes(max_bytes: int = CODE_MAX_BYTES) -> bytes:
    """The first ``max_bytes`` of the running Python's standard-library source code.

    The top-level ``.py`` files of the standard library directory
    (``sysconfig.get_paths()["stdlib"]``; packages and ``site-packages`` are not walked),
    in sorted file-name order, each preceded by a ``# file: NAME`` line and joined by blank
    lines, cut at ``max_bytes``. Deterministic for a given Python installation; a different
    Python version has other files and other code (CPython 3.11.7: 168 files, 4,698,388
    bytes before the cut; the default 1,000,000-byte cut ends inside ``configparser.py``, SHA-256
    ef7e7ab4e416f95a850683853a1761b7450b54a1ad3c4f6ea43a57aa488719d5).

    Args:
      max_bytes: the byte budget, at least 1.

    Returns:
      The bytes (at most ``max_bytes``).
    """
    import sysconfig

    max_bytes = check_int("max_bytes", max_bytes, 1)
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py") and os.path.isfile(os.path.join(stdlib, n)))
    out = bytearray()
    for name in names:
        with open(os.path.join(stdlib, name), "rb") as f:
            out += f"# file: {name}\n".encode() + f.read() + b"\n\n"
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def load_python_code(context: int = 64, val_fraction: float = 0.1, max_bytes: int = CODE_MAX_BYTES) -> TextCorpus:
    """Python source code as a byte-level corpus: a fine-tuning domain for models pretrained
    on :func:`load_text` (documentation prose -> code).

    The bytes are :func:`python_code_bytes` (``max_bytes`` of the running Python's
    standard-library ``.py`` files, sorted by name; they differ between Python versions),
    split as :func:`load_text` splits: the last ``val_fraction`` for validation.

    Returns:
      A ``TextCorpus`` named ``"python_code_X.Y"``.
    """
    context = check_int("context", context, 1)
    val_fraction = check_fraction("val_fraction", val_fraction)
    data = np.frombuffer(python_code_bytes(max_bytes), dtype=np.uint8)
    num_val = round(val_fraction * data.shape[0])
    num_train = data.shape[0] - num_val
    if min(num_train, num_val) < context + 1:
        raise ValueError(
            f"max_bytes={max_bytes} with val_fraction={val_fraction} gives {num_train} train and {num_val} "
            f"val bytes; context={context} needs at least {context + 1} in each"
        )
    name = f"python_code_{sys.version_info.major}.{sys.version_info.minor}"
    return TextCorpus(train=data[:num_train], val=data[num_train:], context=context, name=name)
