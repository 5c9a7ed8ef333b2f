"""Write the notebooks in notebooks/ from the cell sources below (outputs stay empty).

Editing a notebook by hand works too; this script keeps their source reviewable.
    python scripts/make_notebooks.py
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

INSTALL = '''\
# Colab / fresh kernel: install jaxopt_lab when it is missing.
# JAXOPT_LAB_SOURCE: where to install from (a git URL or a local checkout).
import importlib.util, os, sys
if importlib.util.find_spec("jaxopt_lab") is None:
    source = os.environ.get("JAXOPT_LAB_SOURCE", "git+https://github.com/jaxopt-lab/jaxopt_lab.git")
    import subprocess
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", source])'''

QUICKSTART = [
    new_markdown_cell(
        "# jaxopt_lab quickstart\n\n"
        "Train the `nano` GPT on the byte-level text that ships with Python, with an optax pipeline that "
        "chains a jaxopt_lab transform (⊥Grad) in front of AdamW, in a flax nnx `Optimizer`. "
        "Runs on a CPU in a few minutes; a Colab GPU runtime is faster."
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        "import os\n"
        "import jax, optax, numpy as np\n"
        "from flax import nnx\n"
        "import jaxopt_lab\n"
        "from jaxopt_lab.data import load_text\n"
        "from jaxopt_lab.models import GPT\n\n"
        "STEPS = int(os.environ.get('QUICKSTART_STEPS', 300))  # the test suite runs a few\n"
        "BATCH = 32\n"
        "corpus = load_text(context=64)\n"
        "print(f'{corpus.train.size:,} training bytes, {corpus.val.size:,} validation bytes; {jax.devices()}')"
    ),
    new_code_cell(
        "model = GPT.from_preset('nano', rngs=nnx.Rngs(0))\n"
        "schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(30, STEPS), STEPS, 3e-4)\n"
        "tx = optax.chain(\n"
        "    jaxopt_lab.orthogonal_grad(),          # ⊥Grad (Prieto et al. 2025)\n"
        "    optax.clip_by_global_norm(1.0),\n"
        "    optax.adamw(schedule, b2=0.95, weight_decay=0.1),\n"
        ")\n"
        "optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)\n\n"
        "def loss_fn(model, tokens, targets):\n"
        "    logits = model(tokens)\n"
        "    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()\n\n"
        "@nnx.jit\n"
        "def train_step(model, optimizer, tokens, targets):\n"
        "    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, targets)\n"
        "    optimizer.update(model, grads)\n"
        "    return loss\n\n"
        "@nnx.jit\n"
        "def eval_loss(model, tokens, targets):\n"
        "    return loss_fn(model, tokens, targets)\n\n"
        "def validation_loss(model, batches=10):\n"
        "    return float(np.mean([eval_loss(model, x, y) for x, y in corpus.eval_batches(BATCH, max_batches=batches)\n"
        "                          if x.shape[0] == BATCH]))"
    ),
    new_code_cell(
        "history = {'step': [], 'train': [], 'val_step': [0], 'val': [validation_loss(model)]}\n"
        "for step in range(STEPS):\n"
        "    tokens, targets = corpus.batch(step, BATCH, seed=0)\n"
        "    history['step'].append(step + 1)\n"
        "    history['train'].append(float(train_step(model, optimizer, tokens, targets)))\n"
        "    if (step + 1) % max(1, STEPS // 6) == 0 or step + 1 == STEPS:\n"
        "        history['val_step'].append(step + 1)\n"
        "        history['val'].append(validation_loss(model))\n"
        "print(f\"validation loss {history['val'][0]:.3f} -> {history['val'][-1]:.3f} after {STEPS} steps\")"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(6, 3.5))\n"
        "plt.plot(history['step'], history['train'], label='train', alpha=0.6)\n"
        "plt.plot(history['val_step'], history['val'], 'o-', label='validation')\n"
        "plt.xlabel('step'); plt.ylabel('cross-entropy (nats/byte)'); plt.legend(); plt.grid(alpha=0.3)\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "The same run as a config: `jaxopt-lab run experiments/quickstart.toml` "
        "(checkpoints, metrics, TensorBoard and resume included)."
    ),
]


DILOCO = [
    new_markdown_cell(
        "# DiLoCo vs data parallel, with simulated workers\n\n"
        "Each method is an optax transformation written for ONE worker with collectives over the named "
        "axis `workers`; `WorkerRunner` runs it over W workers (here `vmap` on one device; "
        "`mode='shard_map'` spreads them over devices). We train a small MLP on digits with 8 workers and "
        "compare loss against bytes each worker sent."
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        "import os\n"
        "import jax, numpy as np, optax\n"
        "from flax import nnx\n"
        "import jaxopt_lab\n"
        "from jaxopt_lab.data import load_digits\n"
        "from jaxopt_lab.distributed import WorkerRunner, communicated_bytes\n"
        "from jaxopt_lab.models import MLP\n\n"
        "STEPS = int(os.environ.get('DILOCO_STEPS', 200))\n"
        "W, BATCH = 8, 16\n"
        "data = load_digits()\n"
        "runner = WorkerRunner(W, mode='vmap')\n"
        "graphdef, params0 = nnx.split(MLP(64, (64,), 10, rngs=nnx.Rngs(0)), nnx.Param)"
    ),
    new_code_cell(
        "def make_step(tx):\n"
        "    def step(params, state, x, y):  # written for one worker\n"
        "        def loss(p):\n"
        "            return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()\n"
        "        value, grads = jax.value_and_grad(loss)(params)\n"
        "        updates, state = tx.update(grads, state, params)\n"
        "        return optax.apply_updates(params, updates), state, value\n"
        "    return runner.map(step)\n\n"
        "def test_loss(params):\n"
        "    p = jax.tree.map(lambda a: a.mean(axis=0), params)  # the workers' average\n"
        "    logits = nnx.merge(graphdef, p)(data.x_test)\n"
        "    return float(optax.softmax_cross_entropy_with_integer_labels(logits, data.y_test).mean())\n\n"
        "def train(tx):\n"
        "    step = make_step(tx)\n"
        "    params = runner.put(runner.replicate(params0))\n"
        "    state = runner.put(runner.replicate(tx.init(params0)))\n"
        "    curve = []\n"
        "    for t in range(STEPS):\n"
        "        xs, ys = zip(*(data.batch(t * W + w, BATCH, seed=0) for w in range(W)))\n"
        "        params, state, _ = step(params, state, np.stack(xs), np.stack(ys))\n"
        "        if (t + 1) % 10 == 0:\n"
        "            curve.append((t + 1, communicated_bytes(state).mean(), test_loss(params)))\n"
        "    return np.array(curve)\n\n"
        "inner = lambda: optax.adamw(3e-3)\n"
        "runs = {\n"
        "    'data parallel': train(jaxopt_lab.data_parallel(inner())),\n"
        "    'DiLoCo H=10': train(jaxopt_lab.diloco(inner(), sync_every=10)),\n"
        "    'DiLoCo H=50': train(jaxopt_lab.diloco(inner(), sync_every=50)),\n"
        "    'gossip ring': train(jaxopt_lab.gossip(inner(), 'ring')),\n"
        "}\n"
        "for name, c in runs.items():\n"
        "    print(f'{name:14s} final test loss {c[-1, 2]:.3f}  bytes/worker {c[-1, 1]:.3e}')"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))\n"
        "for name, c in runs.items():\n"
        "    ax[0].plot(c[:, 0], c[:, 2], label=name)\n"
        "    ax[1].plot(np.maximum(c[:, 1], 1), c[:, 2], label=name)\n"
        "ax[0].set_xlabel('step'); ax[1].set_xlabel('bytes sent per worker'); ax[1].set_xscale('log')\n"
        "for a in ax: a.set_ylabel('test loss'); a.grid(alpha=0.3)\n"
        "ax[0].legend(); plt.tight_layout(); plt.show()"
    ),
]


def write(name, cells):
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })
    path = os.path.join(os.path.dirname(__file__), "..", "notebooks", name)
    nbformat.write(nb, path)
    print(path)


if __name__ == "__main__":
    write("00_quickstart.ipynb", QUICKSTART)
    write("01_diloco.ipynb", DILOCO)
