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
