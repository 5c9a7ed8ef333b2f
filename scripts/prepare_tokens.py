"""Turn a folder of text files into token files for ``data.name = "tokens"``.

Writes ``OUT/train.bin`` and ``OUT/val.bin`` (flat token ids, nanoGPT's ``.bin``) and
``OUT/meta.json`` (vocabulary size, dtype, counts), which ``load_tokens`` reads:

    python scripts/prepare_tokens.py path/to/texts data/mytexts
    python scripts/prepare_tokens.py path/to/texts data/mytexts --val-fraction 0.0005 --pattern '**/*.txt'

Tokens are bytes by default (uint16 ids 0..255, vocabulary 256). A tokenizer is a
``module:function`` that maps a file's text to a list of ids, with the vocabulary size as the
module's ``vocab_size`` (or ``--vocab-size``); e.g. GPT-2's BPE, as nanoGPT's OpenWebText:

    # gpt2_tokens.py, somewhere on PYTHONPATH
    import tiktoken
    _enc = tiktoken.get_encoding("gpt2")
    vocab_size = _enc.n_vocab  # 50257

    def encode(text):
        return _enc.encode_ordinary(text) + [_enc.eot_token]  # end-of-text after each document

    python scripts/prepare_tokens.py openwebtext/ data/openwebtext --tokenizer gpt2_tokens:encode --val-fraction 0.0005

``--bench`` then times reading a config's batches from the result (ms per step; see README, Data).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxopt_lab.data.tokens import load_tokens, prepare_tokens  # noqa: E402


def bench(out: str, seq_len: int, batch_size: int, workers: int, steps: int, seed: int = 0) -> dict:
    """Median and mean ms per step to read ``workers`` x ``batch_size`` windows of ``seq_len`` through
    the trainer's loader (the grain iterator, prefetch on), over ``steps`` steps after one warm-up, and
    the median of the same reads done synchronously (``loader.dataset[step]``)."""
    data = load_tokens(out, seq_len=seq_len)
    loader = data.loader(batch_size, seed, num_workers=workers)
    next(loader)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x, _ = next(loader)
        times.append(time.perf_counter() - t)
    direct = []  # the same reads without grain's prefetch: dataset[step], synchronous
    for step in range(steps + 1, 2 * steps + 1):
        t = time.perf_counter()
        loader.dataset[step]
        direct.append(time.perf_counter() - t)
    return {"shape": tuple(x.shape), "median_ms": 1e3 * float(np.median(times)), "mean_ms": 1e3 * float(np.mean(times)),
            "tokens_per_s": x.size / float(np.mean(times)), "direct_median_ms": 1e3 * float(np.median(direct))}


def write_synthetic(out: str, n: int, val_fraction: float, seed: int) -> None:
    """``n`` random uint16 byte tokens, written in chunks, split like ``prepare_tokens``."""
    import json

    os.makedirs(out, exist_ok=True)
    num_val = round(val_fraction * n)
    rng = np.random.default_rng(seed)
    for name, count in (("train.bin", n - num_val), ("val.bin", num_val)):
        with open(os.path.join(out, name), "wb") as f:
            for lo in range(0, count, 1 << 24):
                rng.integers(0, 256, size=min(1 << 24, count - lo), dtype=np.uint16).tofile(f)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"vocab_size": 256, "dtype": "uint16", "tokenizer": "synthetic", "train_tokens": n - num_val,
                   "val_tokens": num_val}, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of text files (ignored with --synthetic)")
    p.add_argument("out", help="output folder (train.bin, val.bin, meta.json)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="instead of src: N seeded random byte tokens (90%% train), to --bench reading at scale")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tokens at the end of the shuffled stream kept for val")
    p.add_argument("--tokenizer", default=None, help="module:function (text -> ids); default: bytes")
    p.add_argument("--vocab-size", type=int, default=None, help="default: 256 for bytes, else the module's vocab_size")
    p.add_argument("--dtype", choices=["uint16", "uint32"], default=None, help="default: uint16 if the vocabulary fits")
    p.add_argument("--pattern", default="**/*", help="glob of the files under src (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the files' shuffled order")
    p.add_argument("--skip-prepare", action="store_true", help="only --bench an existing OUT")
    p.add_argument("--bench", action="store_true", help="time reading batches from OUT afterwards")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    if args.synthetic:
        write_synthetic(args.out, args.synthetic, args.val_fraction, args.seed)
    elif not args.skip_prepare:
        t = time.perf_counter()
        meta = prepare_tokens(args.src, args.out, val_fraction=args.val_fraction, tokenizer=args.tokenizer,
                              vocab_size=args.vocab_size, dtype=args.dtype, pattern=args.pattern, seed=args.seed)
        print(f"{args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}, "
              f"vocabulary {meta['vocab_size']}) from {meta['files']} files in {time.perf_counter() - t:.1f} s")
    if args.bench:
        r = bench(args.out, args.seq_len, args.batch_size, args.workers, args.steps)
        print(f"read {r['shape']} per step: {r['median_ms']:.2f} ms median, {r['mean_ms']:.2f} ms mean "
              f"({r['tokens_per_s'] / 1e6:.1f} M tokens/s); without prefetch {r['direct_median_ms']:.2f} ms median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
