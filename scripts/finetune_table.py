"""Print the README table of experiments/finetune_gpt_code_lora.toml from its runs (summary.json, first metrics line)."""
import json, os
base = "runs/finetune_gpt_code_lora"
print("| variant | eval loss at step 0 | eval loss at step 200 | eval acc | trainable params | opt state bytes | steps/s |")
print("|---|---:|---:|---:|---:|---:|---:|")
for v in ("lora", "lora_pro", "lora_ggpo", "full"):
    d = os.path.join(base, v)
    if not os.path.exists(os.path.join(d, "summary.json")):
        continue
    s = json.load(open(os.path.join(d, "summary.json")))
    first = json.loads(open(os.path.join(d, "metrics.jsonl")).readline())
    tp = s["trainable_params"] if "trainable_params" in s else (s["opt_state_bytes"] - 4) // 8
    print(f"| {v} | {first['eval_loss']:.4f} | {s['eval_loss']:.4f} | {s['eval_accuracy']:.4f} | "
          f"{tp:,} | {s['opt_state_bytes']:.3e} | {s['steps_per_sec']:.2f} |")
