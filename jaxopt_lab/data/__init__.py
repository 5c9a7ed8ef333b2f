"""Offline, seeded data sets for optimizer experiments (numpy only, no jax).

Every loader takes plain keyword arguments with defaults, so an experiment
config can pick one from ``DATASETS`` by name and pass its keyword arguments.
Array data sets (``ArrayDataset``) and the byte-level corpus (``TextCorpus``)
share the same batching interface: ``batch(step, batch_size, seed)`` and
``eval_batches(batch_size, split, max_batches)``. Token files (``TokenFiles``,
``data.name = "tokens"``) add per-worker grain datasets and a checkpointable
iterator (``loader``).
"""

from collections.abc import Callable

from jaxopt_lab.data.arrays import ArrayDataset, load_npz, load_npz_dataset
from jaxopt_lab.data.digits import load_digits
from jaxopt_lab.data.modular import OPS, is_prime, modular_arithmetic, modular_table
from jaxopt_lab.data.partition import (
    ClientPartition,
    dirichlet_partition,
    iid_partition,
    infer_num_classes,
)
from jaxopt_lab.data.splits import shuffled_split, stratified_split
from jaxopt_lab.data.synthetic import least_squares, logistic_regression, true_weights
from jaxopt_lab.data.text import (
    CORPUS_MODULES,
    TextCorpus,
    default_corpus_text,
    load_python_code,
    load_text,
    python_code_bytes,
    snapshot_corpus_bytes,
)
from jaxopt_lab.data.tokens import TokenFiles, TokenLoader, load_tokens, prepare_tokens

DATASETS: dict[str, Callable] = {
    "digits": load_digits,
    "modular": modular_arithmetic,
    "text": load_text,
    "python_code": load_python_code,
    "least_squares": least_squares,
    "logistic": logistic_regression,
    "npz": load_npz_dataset,
    "tokens": load_tokens,
}

__all__ = [
    "ArrayDataset",
    "CORPUS_MODULES",
    "ClientPartition",
    "DATASETS",
    "OPS",
    "TextCorpus",
    "TokenFiles",
    "TokenLoader",
    "default_corpus_text",
    "dirichlet_partition",
    "iid_partition",
    "infer_num_classes",
    "is_prime",
    "least_squares",
    "load_digits",
    "load_npz",
    "load_npz_dataset",
    "load_python_code",
    "load_text",
    "load_tokens",
    "logistic_regression",
    "modular_arithmetic",
    "modular_table",
    "prepare_tokens",
    "python_code_bytes",
    "shuffled_split",
    "snapshot_corpus_bytes",
    "stratified_split",
    "true_weights",
]
