"""Print the README table of experiments/finetune_cnn_digits59.toml from its runs: per method, the mean
± sample std (ddof 1) over the seeds of each run's summary.json (and its first metrics line, step 0);
``--plot PNG`` also draws eval accuracy against step per method (mean over seeds, min–max shaded)."""
import argparse
import json
import math
import os

import numpy as np

METHODS = {"full": "full fine-tuning", "lora": "LoRA r4 (convs) + head", "galore": "GaLore r8 (convs as matrices)",
           "probe": "head only (linear probe)", "lora_pro": "LoRA-Pro r4 (convs) + head",
           "lora_ggpo": "LoRA-GGPO r4 (convs) + head", "ist": "IST r4 (convs, 1 of 2 per step) + head",
           "eva": "EVA r4 budget (convs' patches) + head", "svfit": "SVFit top-4 singular values (convs) + head",
           "welore": "WeLore 30% compression (convs) + head", "snella": "SNELLA r16 mixk (convs) + head"}


def n_params(run_dir):
    from jaxopt_lab.finetune.pretrained import restore_params

    return sum(math.prod(v.shape) for v in restore_params(run_dir).values())


def mean_std(xs, fmt):
    xs = np.asarray(xs, np.float64)
    return fmt.format(xs.mean()) + (" ± " + fmt.format(xs.std(ddof=1)) if len(xs) > 1 else "")


def seed_runs(base, method):
    """The finished run folders ``METHOD_sK`` of one method."""
    return sorted(os.path.join(base, d) for d in os.listdir(base)
                  if d.startswith(method + "_s") and os.path.exists(os.path.join(base, d, "summary.json")))


def table(base):
    lines = ["| method | seeds | trainable params | opt state bytes | peak memory (MiB) | steps/s | "
             "eval acc (5-9) at step 0 | eval loss | eval acc (5-9) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, label in METHODS.items():
        runs = seed_runs(base, m)
        if not runs:
            continue
        rows = []
        for d in runs:
            s = json.load(open(os.path.join(d, "summary.json")))
            first = json.loads(open(os.path.join(d, "metrics.jsonl")).readline())
            tp = s.get("trainable_params") or n_params(d)
            peak = s.get("peak_memory_bytes")
            rows.append((tp, s["opt_state_bytes"], math.nan if peak is None else peak / 2**20, s["steps_per_sec"],
                         first["eval_accuracy"], s["eval_loss"], s["eval_accuracy"]))
        tp, ob, peak, sps, acc0, loss, acc = zip(*rows)
        assert len(set(tp)) == 1 and len(set(ob)) == 1, (tp, ob)
        lines.append(f"| {label} | {len(runs)} | {tp[0]:,} | {ob[0]:,} | {mean_std(peak, '{:.2f}')} | "
                     f"{mean_std(sps, '{:.1f}')} | {mean_std(acc0, '{:.3f}')} | {mean_std(loss, '{:.4f}')} | "
                     f"{mean_std(acc, '{:.4f}')} |")
    return "\n".join(lines)


def plot(base, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, label in METHODS.items():
        curves = []
        for d in seed_runs(base, m):
            rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
            curves.append({r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r})
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        vals = np.array([[c[s] for c in curves] for s in steps])
        (line,) = ax.plot(steps, vals.mean(1), marker="o", markersize=3, label=label)
        ax.fill_between(steps, vals.min(1), vals.max(1), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("eval accuracy on digits 5–9")
    ax.set_title("CNN pretrained on digits 0–4, fine-tuned on 5–9 (mean of the seeds, min–max shaded)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", nargs="?", default="runs/finetune_cnn_digits59")
    ap.add_argument("--plot", default=None, help="also draw eval accuracy vs step to this PNG")
    args = ap.parse_args(argv)
    print(table(args.base))
    if args.plot:
        print(f"wrote {plot(args.base, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
