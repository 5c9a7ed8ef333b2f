"""Print the README table of experiments/finetune_cnn_digits59.toml from its runs: per method, the mean
± sample std (ddof 1) over the seeds of each run's summary.json (and its first metrics line, step 0)."""
import json
import math
import os
import sys

import numpy as np

base = sys.argv[1] if len(sys.argv) > 1 else "runs/finetune_cnn_digits59"
methods = {"full": "full fine-tuning", "lora": "LoRA r4 (convs) + head", "galore": "GaLore r8 (convs as matrices)",
           "probe": "head only (linear probe)"}


def n_params(run_dir):
    from jaxopt_lab.finetune.pretrained import restore_params

    return sum(math.prod(v.shape) for v in restore_params(run_dir).values())


def mean_std(xs, fmt):
    xs = np.asarray(xs, np.float64)
    return fmt.format(xs.mean()) + (" ± " + fmt.format(xs.std(ddof=1)) if len(xs) > 1 else "")


print("| method | seeds | trainable params | opt state bytes | peak memory (MiB) | steps/s | eval acc (5-9) at step 0 | eval loss | eval acc (5-9) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for m, label in methods.items():
    runs = sorted(d for d in os.listdir(base) if d.startswith(m + "_s") and os.path.exists(os.path.join(base, d, "summary.json")))
    if not runs:
        continue
    rows = []
    for d in runs:
        s = json.load(open(os.path.join(base, d, "summary.json")))
        first = json.loads(open(os.path.join(base, d, "metrics.jsonl")).readline())
        tp = s.get("trainable_params") or n_params(os.path.join(base, d))
        peak = s.get("peak_memory_bytes")
        rows.append((tp, s["opt_state_bytes"], math.nan if peak is None else peak / 2**20, s["steps_per_sec"], first["eval_accuracy"], s["eval_loss"], s["eval_accuracy"]))
    tp, ob, peak, sps, acc0, loss, acc = zip(*rows)
    assert len(set(tp)) == 1 and len(set(ob)) == 1, (tp, ob)
    print(f"| {label} | {len(runs)} | {tp[0]:,} | {ob[0]:,} | {mean_std(peak, '{:.2f}')} | {mean_std(sps, '{:.1f}')} | {mean_std(acc0, '{:.3f}')} | "
          f"{mean_std(loss, '{:.4f}')} | {mean_std(acc, '{:.4f}')} |")
