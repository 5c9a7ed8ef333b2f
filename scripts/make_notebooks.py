"""Write the notebooks in notebooks/ from the cell sources below (outputs stay empty).

Editing a notebook by hand works too; this script keeps their source reviewable.
    python scripts/make_notebooks.py
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

INSTALL = '''\
# Colab / fresh kernel: install jaxopt_lab when it is missing.
# SOURCE: where to install it from (a git URL or a local checkout), or set JAXOPT_LAB_SOURCE.
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("JAXOPT_LAB_SOURCE", "")
if importlib.util.find_spec("jaxopt_lab") is None:
    if not SOURCE:
        raise RuntimeError("jaxopt_lab is not installed: set SOURCE above to its git URL or a local checkout")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", SOURCE])'''

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


SHARPNESS = [
    new_markdown_cell(
        "# Optimizers and sharpness\n\n"
        "Compare the optimizer zoo on digits (AdamW, SGD with momentum, diffGrad, AdamP, ⊥AdamW) with a small "
        "MLP, and track the sharpness (the top Hessian eigenvalue of the loss on the current batch, by Lanczos) "
        "over training. Full-batch gradient descent with step η is stable only while sharpness < 2/η; "
        "Cohen et al. (2021) find that training drives sharpness up to that edge. For adaptive optimizers "
        "the raw sharpness is not bounded by 2/η (their preconditioned sharpness is), so the 2/η line is drawn "
        "for SGD only."
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        "import os\n"
        "import jax, numpy as np, optax\n"
        "from flax import nnx\n"
        "import jaxopt_lab\n"
        "from jaxopt_lab.data import load_digits\n"
        "from jaxopt_lab.diagnostics import edge_of_stability\n"
        "from jaxopt_lab.models import MLP\n\n"
        "STEPS = int(os.environ.get('NB05_STEPS', 300))  # the test suite runs a few\n"
        "BATCH = 64\n"
        "EVAL_EVERY = max(1, STEPS // 30)     # test accuracy\n"
        "SHARP_EVERY = max(5, STEPS // 15)    # sharpness (a few Lanczos steps each)\n"
        "data = load_digits()\n"
        "graphdef, params0 = nnx.split(MLP(64, (64,), 10, rngs=nnx.Rngs(0)), nnx.Param)\n"
        "print(f'{len(data.y_test)} test digits; {jax.devices()}')"
    ),
    new_code_cell(
        "def loss(params, x, y):\n"
        "    logits = nnx.merge(graphdef, params)(x)\n"
        "    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()\n\n"
        "@jax.jit\n"
        "def test_accuracy(params):\n"
        "    logits = nnx.merge(graphdef, params)(data.x_test)\n"
        "    return (logits.argmax(-1) == data.y_test).mean()\n\n"
        "@jax.jit  # compiled once: the batch and the learning rate are arguments\n"
        "def eos(params, x, y, lr, key):\n"
        "    return edge_of_stability(lambda p: loss(p, x, y), params, lr, key, num_iters=20)\n\n"
        "def make_step(tx):\n"
        "    @jax.jit\n"
        "    def step(params, state, x, y):\n"
        "        value, grads = jax.value_and_grad(loss)(params, x, y)\n"
        "        updates, state = tx.update(grads, state, params)  # adamp / perp_adamw need params\n"
        "        return optax.apply_updates(params, updates), state, value\n"
        "    return step\n\n"
        "def train(tx, lr):\n"
        "    step, params = make_step(tx), params0\n"
        "    state = tx.init(params)\n"
        "    acc, sharp = [(0, float(test_accuracy(params)))], []\n"
        "    key = jax.random.key(0)\n"
        "    for t in range(STEPS):\n"
        "        x, y = data.batch(t, BATCH, seed=0)\n"
        "        if t % SHARP_EVERY == 0 or t + 1 == STEPS:  # at the params the step starts from\n"
        "            key, sub = jax.random.split(key)\n"
        "            sharp.append((t, float(eos(params, x, y, lr, sub)['sharpness'])))\n"
        "        params, state, _ = step(params, state, x, y)\n"
        "        if (t + 1) % EVAL_EVERY == 0 or t + 1 == STEPS:\n"
        "            acc.append((t + 1, float(test_accuracy(params))))\n"
        "    return {'lr': lr, 'acc': np.array(acc), 'sharp': np.array(sharp)}\n\n"
        "zoo = {  # name: (optimizer, learning rate)\n"
        "    'AdamW': (optax.adamw, 1e-3),\n"
        "    'SGD+momentum': (lambda lr: optax.sgd(lr, momentum=0.9), 5e-2),\n"
        "    'diffGrad': (jaxopt_lab.diffgrad, 1e-3),\n"
        "    'AdamP': (jaxopt_lab.adamp, 1e-3),\n"
        "    'perp AdamW': (jaxopt_lab.perp_adamw, 1e-3),\n"
        "}\n"
        "runs = {}\n"
        "for name, (make, lr) in zoo.items():\n"
        "    runs[name] = r = train(make(lr), lr)\n"
        "    print(f\"{name:13s} final test accuracy {r['acc'][-1, 1]:.3f}  sharpness {r['sharp'][-1, 1]:.2f}\")"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))\n"
        "for name, r in runs.items():\n"
        "    ax[0].plot(r['acc'][:, 0], r['acc'][:, 1], label=name)\n"
        "    line, = ax[1].plot(r['sharp'][:, 0], r['sharp'][:, 1], 'o-', ms=3, label=name)\n"
        "    if name.startswith('SGD'):\n"
        "        ax[1].axhline(2 / r['lr'], ls='--', color=line.get_color(), label=f\"2/lr (SGD, lr={r['lr']:g})\")\n"
        "ax[0].set_ylabel('test accuracy'); ax[1].set_ylabel('sharpness (top Hessian eigenvalue)')\n"
        "ax[1].set_yscale('log')\n"
        "for a in ax: a.set_xlabel('step'); a.grid(alpha=0.3)\n"
        "ax[0].legend(); ax[1].legend(fontsize=8); plt.tight_layout(); plt.show()"
    ),
    new_markdown_cell(
        "With momentum β the stability threshold of SGD is (2 + 2β)/η rather than 2/η, so the dashed "
        "line is a conservative reference. Sharpness here is measured on each step's minibatch, which is "
        "noisier than the full-batch quantity in Cohen et al. AdamP only differs from Adam on weights whose "
        "gradient is (nearly) orthogonal to them (scale-invariant weights, e.g. before a normalization layer); "
        "this MLP has none, so its curves sit on AdamW's."
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
    write("05_optimizers_and_sharpness.ipynb", SHARPNESS)
