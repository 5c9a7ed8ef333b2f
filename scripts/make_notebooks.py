"""Write the notebooks in notebooks/ from the cell sources below, and run them for their outputs.

    python scripts/make_notebooks.py --execute   # write every notebook and run it: outputs committed
    python scripts/make_notebooks.py [NAME ...]  # write (these) notebooks without outputs

The notebooks are committed with their outputs (tables and plots show where the repository is
browsed, and in the documentation site, which does not run them); regenerate them with
``--execute`` after changing a cell below. Each opens with an "Open in Colab" badge, and its
install cell installs ``git+<repository URL>`` when jaxopt_lab is missing. The repository's URL
is read from pyproject.toml's ``[project.urls] Repository``: change it there, then rerun this.
"""

import os
import sys
import tomllib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    REPOSITORY_URL = tomllib.load(_f)["project"]["urls"]["Repository"].rstrip("/")
BRANCH = "main"


def colab_badge(name: str) -> str:
    """Markdown of the "Open in Colab" badge of ``notebooks/<name>`` (Colab opens it from GitHub)."""
    path = REPOSITORY_URL.removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


INSTALL = f'''\
# Colab / a fresh kernel: install jaxopt_lab when it is missing (from its repository by default;
# JAXOPT_LAB_SOURCE may name another git URL or a local checkout).
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("JAXOPT_LAB_SOURCE", "git+{REPOSITORY_URL}")
if importlib.util.find_spec("jaxopt_lab") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", SOURCE])'''

# Results print as Markdown tables (pandas is not a dependency): Jupyter, Colab and GitHub render them.
TABLE = '''\
from IPython.display import display

def show_table(rows):
    """A list of dicts (one per row, the same keys) as a Markdown table."""
    cols = list(rows[0])
    lines = ['| ' + ' | '.join(cols) + ' |', '|---|' + '---:|' * (len(cols) - 1)]
    lines += ['| ' + ' | '.join(str(r[c]) for c in cols) + ' |' for r in rows]
    text = '\\n'.join(lines)
    display({'text/markdown': text, 'text/plain': text}, raw=True)'''

QUICKSTART = [
    new_markdown_cell(
        "# jaxopt_lab quickstart\n\n"
        "Train the `nano` GPT on the byte-level text of Python's own docs (a snapshot shipped with the package, the same bytes on every Python), with an optax pipeline that "
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
        "show_table([{'step': t, 'validation loss (nats/byte)': f'{v:.3f}'} for t, v in zip(history['val_step'], history['val'])])"
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
        "show_table([{'method': name, 'final test loss': f'{c[-1, 2]:.3f}', 'bytes/worker': f'{c[-1, 1]:.3e}'}\n"
        "            for name, c in runs.items()])"
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
        "    runs[name] = train(make(lr), lr)\n"
        "show_table([{'optimizer': name, 'final test accuracy': f\"{r['acc'][-1, 1]:.3f}\",\n"
        "             'sharpness': f\"{r['sharp'][-1, 1]:.2f}\"} for name, r in runs.items()])"
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


# 04: one section per kernel (a markdown cell, a check against the reference, a timing); a new kernel
# adds its own *_SECTION list to KERNELS.
KERNELS_INTRO = [
    new_markdown_cell(
        "# Pallas kernels\n\n"
        "`jaxopt_lab.kernels` holds Pallas kernels for the memory-bound parts, each beside a pure-`jnp` "
        "reference. Every kernel takes `impl`: `None` (auto: Pallas on GPU with the Triton lowering and on "
        "TPU with Mosaic, the reference elsewhere), `'pallas'`, `'interpret'` (Pallas interpret mode, any "
        "platform) or `'reference'`.\n\n"
        "On a CPU runtime this notebook runs the kernels in interpret mode and compares them with the "
        "references; on a GPU or TPU runtime it also times the compiled kernels against the XLA-compiled "
        "references and reports the bandwidth achieved as a fraction of the chip's HBM bandwidth "
        "(`scripts/bench_kernels.py` prints the same table from the command line)."
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        "import functools\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from jaxopt_lab.kernels import describe, devices\n\n"
        "DEVICE = jax.devices()[0]\n"
        "ACCELERATOR = DEVICE.platform in ('gpu', 'tpu')\n"
        "IMPL = 'pallas' if ACCELERATOR else 'interpret'  # the kernel path to check (and time)\n"
        "SPEC = devices.device_spec(DEVICE)\n"
        "print(f'{DEVICE.device_kind}: kernels run as {describe(IMPL)}; '\n"
        "      f'ceilings: {SPEC or \"n/a (CPU or an unknown device)\"}')\n\n"
        "def max_rel_err(got, want):\n"
        "    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)\n"
        "    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))\n\n"
        "def timing_row(label, seconds, nbytes, baselines):\n"
        "    bw = nbytes / seconds\n"
        "    base = ', '.join(f'{k} {t * 1e3:.3f} ms ({t / seconds:.2f}x)' for k, t in baselines.items())\n"
        "    return {'kernel': label, 'ms': f'{seconds * 1e3:.3f}', 'GB/s': f'{bw / 1e9:.1f}',\n"
        "            'of HBM': devices.fraction(bw, SPEC and SPEC.hbm_bytes_per_s), 'vs': base}"
    ),
]

GRKAN_SECTION = [
    new_markdown_cell(
        "## GR-KAN: KAT's group-rational activation (FlashKAT-style backward)\n\n"
        "KAT (Yang & Wang, 2024) replaces a transformer MLP's GELU by learnable rationals shared by each of "
        "G = 8 channel groups: for channel c of group g,\n\n"
        "$$y = \\frac{P(x)}{Q(x)},\\quad P(x) = \\sum_{k=0}^{5} a_{g,k}\\,x^k,\\quad "
        "Q(x) = 1 + \\sum_{j=1}^{4} |b_{g,j}|\\,|x|^j.$$\n\n"
        "FlashKAT (Raffel & Chen, 2025) traces KAT's slow training to the backward: the gradients of the 80 "
        "shared coefficients were accumulated with global atomic adds. Our backward kernel writes each block's "
        "partial sums to its own slot and sums them afterwards: no atomics, deterministic.\n\n"
        "The coefficients start as in KAT: a least-squares rational fit of a known activation "
        "(`jaxopt_lab.models.kat.fit_rational`)."
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "from jaxopt_lab.kernels import grkan, grkan_bwd, grkan_reference\n"
        "from jaxopt_lab.models.kat import fit_rational\n\n"
        "xs = np.linspace(-4, 4, 400, dtype=np.float32)\n"
        "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
        "for name, ref in [('gelu', jax.nn.gelu(xs, approximate=False)), ('swish', jax.nn.silu(xs))]:\n"
        "    a, b = fit_rational(name)  # fitted on [-3, 3]\n"
        "    y = grkan_reference(jnp.tile(xs[:, None], (1, 8)), jnp.tile(a, (8, 1)), jnp.tile(b, (8, 1)))[:, 0]\n"
        "    ax.plot(xs, ref, 'k:', lw=1)\n"
        "    ax.plot(xs, y, label=f'rational fit of {name} (max err on [-3,3]: '\n"
        "            f'{np.abs(y - ref)[np.abs(xs) <= 3].max():.1e})')\n"
        "ax.legend(fontsize=8); ax.grid(alpha=0.3); ax.set_xlabel('x'); plt.show()"
    ),
    new_code_cell(
        "# The kernel against the reference and against jax autodiff of the reference, on a ragged shape.\n"
        "shape = (16, 197, 768) if ACCELERATOR else (2, 37, 64)\n"
        "k = jax.random.split(jax.random.key(0), 4)\n"
        "a, b = 0.5 * jax.random.normal(k[0], (8, 6)), 0.5 * jax.random.normal(k[1], (8, 4))\n\n"
        "@functools.partial(jax.jit, static_argnames='impl')\n"
        "def forward_and_grads(x, a, b, dy, impl):\n"
        "    y, vjp = jax.vjp(lambda x, a, b: grkan(x, a, b, impl=impl), x, a, b)\n"
        "    return y, *vjp(dy)\n\n"
        "errors = []\n"
        "for dtype in (jnp.float32, jnp.bfloat16):\n"
        "    x = (1.5 * jax.random.normal(k[2], shape)).astype(dtype)\n"
        "    dy = jax.random.normal(k[3], shape).astype(dtype)\n"
        "    got = forward_and_grads(x, a, b, dy, IMPL)\n"
        "    # the reference path: jnp forward, plain jax autodiff, in float32 from the same (rounded) inputs\n"
        "    want = forward_and_grads(x.astype(jnp.float32), a, b, dy.astype(jnp.float32), 'reference')\n"
        "    errors.append({'grkan': jnp.dtype(dtype).name, **{f'max rel err {n}': f'{max_rel_err(g, w):.1e}'\n"
        "                   for n, g, w in zip(('y', 'dx', 'da', 'db'), got, want)}})\n"
        "show_table(errors)"
    ),
    new_code_cell(
        "# Timing (GPU / TPU only): KAT-B's hidden activation, 128 images x 197 tokens x 3072 channels, bf16.\n"
        "if not ACCELERATOR:\n"
        "    print('grkan timing skipped: on CPU the kernel runs in interpret mode (run on a GPU/TPU runtime)')\n"
        "else:\n"
        "    shape = (128, 197, 3072)\n"
        "    x = (1.5 * jax.random.normal(k[2], shape)).astype(jnp.bfloat16)\n"
        "    dy = jax.random.normal(k[3], shape).astype(jnp.bfloat16)\n"
        "    nbytes = x.size * x.dtype.itemsize\n"
        "    fwd = {i: jax.jit(functools.partial(grkan, impl=i)) for i in ('pallas', 'reference')}\n"
        "    bwd = {i: jax.jit(functools.partial(grkan_bwd, impl=i)) for i in ('pallas', 'reference')}\n"
        "    autodiff = jax.jit(lambda x, a, b, dy: jax.vjp(grkan_reference, x, a, b)[1](dy))\n"
        "    t = {i: devices.time_fn(f, x, a, b) for i, f in fwd.items()}\n"
        "    rows = [timing_row('grkan fwd', t['pallas'], 2 * nbytes, {'XLA ref': t['reference']})]\n"
        "    t = {i: devices.time_fn(f, x, a, b, dy) for i, f in bwd.items()}\n"
        "    rows.append(timing_row('grkan bwd', t['pallas'], 3 * nbytes,\n"
        "                           {'XLA ref': t['reference'], 'autodiff': devices.time_fn(autodiff, x, a, b, dy)}))\n"
        "    show_table(rows)"
    ),
]

LOWRANK_STEP_SECTION = [
    new_markdown_cell(
        "## The fused low-rank step (GaLore / Fira)\n\n"
        "For a gradient G (d × k), projector P (d × r) and Adam moments in r × k, GaLore's update is "
        "$\\alpha P N$ with $N = m/(\\sqrt{v}+\\epsilon)$ the Adam direction of $R = P^\\top G$; Fira adds the "
        "residual $(G - \\alpha P R)$ scaled per column by $\\phi_j = \\|N_j\\|/\\|R_j\\|$ and a norm-growth limiter. "
        "Unfused, that is about ten d × k passes through memory. `lowrank_step` does it in two: pass 1 reads G "
        "once for $R$ and the column norms $\\|G_j\\|^2$ (the limiter's $\\|S\\|$ follows from them exactly), the "
        "r × k math runs in XLA, and pass 2 writes $U = P M + G\\,\\mathrm{diag}(s)$ once. `galore(..., fused=True)` "
        "and `fira(..., fused=True)` use it."
    ),
    new_code_cell(
        "from jaxopt_lab.kernels.lowrank_step import lowrank_step\n\n"
        "d, k, r = (4096, 4096, 128) if ACCELERATOR else (96, 80, 8)\n"
        "key = jax.random.split(jax.random.key(1), 3)\n"
        "P, _ = jnp.linalg.qr(jax.random.normal(key[0], (d, r)))\n"
        "mu = 0.1 * jax.random.normal(key[1], (r, k)); nu = mu**2 + 1e-3; prev = jnp.asarray(1.0)\n"
        "step = {i: jax.jit(functools.partial(lowrank_step, scale=0.25, residual=True, impl=i)) for i in (IMPL, 'reference')}\n"
        "errors, timings = [], []\n"
        "for dtype in (jnp.float32, jnp.bfloat16):\n"
        "    G = jax.random.normal(key[2], (d, k)).astype(dtype)\n"
        "    got, want = step[IMPL](G, P, mu, nu, prev), step['reference'](G, P, mu, nu, prev)\n"
        "    errors.append({'fira step': jnp.dtype(dtype).name, 'max rel err update': f'{max_rel_err(got[0], want[0]):.1e}',\n"
        "                   'moments': f'{max_rel_err(got[1], want[1]):.1e}', 'limiter norm': f'{max_rel_err(got[3], want[3]):.1e}'})\n"
        "    if ACCELERATOR:\n"
        "        t = {i: devices.time_fn(f, G, P, mu, nu, prev) for i, f in step.items()}\n"
        "        timings.append(timing_row(f'fira step {jnp.dtype(dtype).name}', t[IMPL], 2 * G.size * G.dtype.itemsize,\n"
        "                                  {'XLA 2-pass': t['reference']}))\n"
        "show_table(errors)\n"
        "if timings:\n"
        "    show_table(timings)"
    ),
]

KERNELS = [*KERNELS_INTRO, *GRKAN_SECTION, *LOWRANK_STEP_SECTION]


def notebook(name, cells):
    """The notebook ``name``: the Colab badge above its title, ``show_table`` after the install cell."""
    cells = [nbformat.from_dict(dict(c)) for c in cells]  # copies: the module-level lists stay as written
    cells[0].source = colab_badge(name) + "\n\n" + cells[0].source
    if any("show_table(" in c.source for c in cells if c.cell_type == "code"):
        at = next(i for i, c in enumerate(cells) if c.source == INSTALL) + 1
        cells.insert(at, new_code_cell(TABLE))
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })


def execute(nb, timeout=3600):
    """Run ``nb`` top to bottom from the repository root (this checkout first on the path), in place."""
    from nbclient import NotebookClient

    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.path.abspath(ROOT) + (os.pathsep + env_path if env_path else "")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    # no machine-specific execution metadata (timestamps) in the committed file
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def write(name, cells, run=False):
    nb = notebook(name, cells)
    if run:
        execute(nb)
    path = os.path.join(ROOT, "notebooks", name)
    nbformat.write(nb, path)
    print(path)


def lowrank_notebook():
    """Cells of notebooks/03_lowrank.ipynb: projectors, GaLore/Fira on digits, memory vs Adam."""
    return [
        new_markdown_cell(
            "# Low-rank (memory-efficient) optimizers\n\n"
            "GaLore-family methods keep Adam's moments in an r-dimensional subspace of each weight matrix's "
            "gradient, reached by a projector P (d × r) refreshed every T steps. This notebook shows the "
            "projectors of `jaxopt_lab.lowrank`, trains a small MLP on digits with GaLore and Fira next to AdamW, "
            "and measures the optimizer state of LLaMA-shaped models against Adam's from shapes alone. "
            "Runs on a CPU in about a minute."
        ),
        new_code_cell(INSTALL),
        new_markdown_cell(
            "## Projectors\n\n"
            "One protocol (`init(G, rank, key)`, `project`, `project_back`), several bases: the exact SVD "
            "(for d ≤ k through the eigenvectors of G Gᵀ), a randomized SVD, int4 storage of the SVD basis "
            "(Q-GaLore), the top-r DCT-II columns by projection norm (only their indices are stored) and a "
            "random Gaussian matrix (APOLLO; only its key is stored). cos(PPᵀG, G) measures how much of the "
            "gradient the rank-r projection keeps."
        ),
        new_code_cell('''import os, time
import jax, jax.numpy as jnp, numpy as np, optax
import jaxopt_lab
from jaxopt_lab.lowrank import (galore, fira, optimizer_state_bytes,
                                state_bytes_report)
from jaxopt_lab.lowrank.projectors import get_projector

STEPS = int(os.environ.get('NB03_STEPS', 300))  # the test suite runs a few
# a gradient-like matrix: 64 x 256 with geometrically decaying singular values
rng = np.random.default_rng(0)
u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
v, _ = np.linalg.qr(rng.standard_normal((256, 64)))
G = jnp.asarray((u * 0.9 ** np.arange(64)) @ v.T, jnp.float32)
rank = 8
best = float(jnp.sum((0.9 ** np.arange(64))[:rank] ** 2) / jnp.sum(0.9 ** (2 * np.arange(64))))
print(f'G: {G.shape}, rank {rank}; the best rank-{rank} subspace has cos(PPᵀG, G) = {best ** 0.5:.3f}')
rows = []
for name in ['svd', 'randomized_svd', 'int4_svd', 'dct', 'random']:
    p = get_projector(name)
    state = p.init(G, rank, jax.random.PRNGKey(0))
    low = p.project(state, G, rank)
    back = p.project_back(state, low, G.shape[0])  # P Pᵀ G
    cos = float(jnp.sum(back * G) / (jnp.linalg.norm(back) * jnp.linalg.norm(G)))
    rows.append({'projector': name, 'cos(PPᵀG, G)': f'{cos:.3f}', 'state bytes': optimizer_state_bytes(state),
                 'state': ', '.join(f'{k} {tuple(x.shape)} {x.dtype}' for k, x in state._asdict().items())})
show_table(rows)'''),
        new_markdown_cell(
            "## GaLore and Fira on a small problem\n\n"
            "A 64-256-10 MLP on the digits, both weight matrices projected at rank 8, refreshed every 50 steps, "
            "the same learning rate and batches for every optimizer."
        ),
        new_code_cell('''from flax import nnx
from jaxopt_lab.data import load_digits
from jaxopt_lab.models import MLP

BATCH = 64
data = load_digits()
graphdef, params0 = nnx.split(MLP(64, (256,), 10, rngs=nnx.Rngs(0)), nnx.Param)

def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(x), y).mean()

@jax.jit
def test_accuracy(params):
    return (nnx.merge(graphdef, params)(data.x_test).argmax(-1) == data.y_test).mean()

def train(tx):
    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value
    params, state, curve = params0, tx.init(params0), []
    for t in range(STEPS):
        x, y = data.batch(t, BATCH, seed=0)
        params, state, value = step(params, state, x, y)
        curve.append(float(value))
    return np.array(curve), float(test_accuracy(params)), state

every_matrix = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)  # project both kernels (no embedding here)
zoo = {
    'AdamW': optax.adamw(1e-3),
    'GaLore r=8': galore(1e-3, rank=8, update_proj_gap=50, scale=1.0, label_fn=every_matrix),
    'Fira r=8': fira(1e-3, rank=8, update_proj_gap=50, label_fn=every_matrix),
    'GaLore-DCT r=8': galore(1e-3, rank=8, update_proj_gap=50, scale=1.0, projector='dct', label_fn=every_matrix),
}
runs, rows = {}, []
for name, tx in zoo.items():
    t0 = time.perf_counter()
    curve, acc, state = train(tx)
    runs[name] = curve
    rows.append({'optimizer': name, 'final test accuracy': f'{acc:.3f}',
                 'optimizer state bytes': optimizer_state_bytes(state), 'seconds': f'{time.perf_counter() - t0:.1f}'})
show_table(rows)'''),
        new_code_cell('''import matplotlib.pyplot as plt
smooth = lambda c: np.convolve(c, np.ones(10) / 10, mode='valid')
plt.figure(figsize=(6, 3.5))
for name, curve in runs.items():
    plt.plot(smooth(curve), label=name)
plt.xlabel('step'); plt.ylabel('training loss (10-step mean)'); plt.yscale('log'); plt.grid(alpha=0.3); plt.legend()
plt.tight_layout(); plt.show()'''),
        new_markdown_cell(
            "## Optimizer-state memory vs Adam\n\n"
            "`state_bytes_report` traces `tx.init` with `jax.eval_shape`, so a LLaMA-shaped model's state is "
            "measured without allocating it. q, k, v, o, gate, up and down are projected; embeddings, head and "
            "norms keep full Adam moments (as in the papers), which is why small models save less. "
            "`python scripts/bench_lowrank_memory.py` prints the full table (60M to 1B)."
        ),
        new_code_cell('''def llama(hidden, intermediate, layers, vocab=32000):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    block = {'q': s(hidden, hidden), 'k': s(hidden, hidden), 'v': s(hidden, hidden), 'o': s(hidden, hidden),
             'gate': s(hidden, intermediate), 'up': s(hidden, intermediate), 'down': s(intermediate, hidden),
             'attn_norm': s(hidden), 'mlp_norm': s(hidden)}
    return {'embed': s(vocab, hidden), 'layers': [block] * layers, 'final_norm': s(hidden), 'head': s(hidden, vocab)}

models = {'LLaMA-60M (r=128)': (llama(512, 1376, 8), 128), 'LLaMA-350M (r=256)': (llama(1024, 2736, 24), 256)}
rows = []
for model, (params, r) in models.items():
    for name, tx in {'GaLore': galore(1e-3, rank=r), 'Fira': fira(1e-3, rank=r),
                     'GaLore int4': galore(1e-3, rank=r, projector='int4_svd'),
                     'GaLore-DCT': galore(1e-3, rank=r, projector='dct')}.items():
        report = state_bytes_report(tx, params)  # against optax.adam, both via jax.eval_shape
        rows.append({'model': model, 'method': name, 'state GB': f"{report['bytes'] / 1e9:.3f}",
                     '× Adam': f"{report['ratio']:.3f}"})
show_table(rows)'''),
    ]


def federated_notebook():
    """Cells of notebooks/02_federated.ipynb: client speeds, a Dirichlet split, FedAvg/FedBuff/FedAsync."""
    return [
        new_markdown_cell(
            "# Federated and asynchronous training in a simulator\n\n"
            "`jaxopt_lab.distributed.federated.FederatedSimulator` runs many clients of different speeds against a "
            "server: an event queue in JAX arrays decides who arrives when, and each server step (a synchronous "
            "round, a buffer of K arrivals, every arrival, ...) applies a server rule, an optax transformation over "
            "the clients' pseudo-gradients. Everything runs inside one compiled `lax.scan`, with a simulated "
            "wall-clock and the staleness of every update recorded. Here: 100 clients on the digits with a "
            "Dirichlet label skew and log-normal speeds, FedAvg against FedBuff and FedAsync for the same "
            "simulated time. Runs on a CPU in about a minute."
        ),
        new_code_cell(INSTALL),
        new_markdown_cell(
            "## Clients: a Dirichlet split and heterogeneous speeds\n\n"
            "`dirichlet_partition` shares out each class by Dirichlet(α) proportions (small α: each client sees few "
            "classes). `client_speeds` draws log-normal speeds, at most 10× apart; a client of speed v takes 1/v "
            "simulated seconds per local step, and each dispatch runs one local epoch (`epoch_steps`)."
        ),
        new_code_cell('''import os, time
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jaxopt_lab.data import load_digits, dirichlet_partition
from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.models import MLP

SIM_TIME = float(os.environ.get('NB02_SIM_TIME', 500))  # simulated seconds per method (the test suite runs less)
NUM_CLIENTS, ALPHA, BATCH = 100, 0.3, 16
data = load_digits()
x_train = data.x_train.reshape(len(data.x_train), -1)
part = dirichlet_partition(data.y_train, NUM_CLIENTS, ALPHA, seed=1)
clients = fl.pad_clients(x_train, data.y_train, part)
steps = fl.epoch_steps(part.sizes, BATCH)                  # one local epoch per dispatch
speeds = fl.client_speeds(NUM_CLIENTS, 'lognormal', sigma=1.0, max_spread=10.0, seed=0)
print(f'{NUM_CLIENTS} clients with {part.sizes.min()}-{part.sizes.max()} examples (Dirichlet alpha={ALPHA}), '
      f'{steps.min()}-{steps.max()} local steps')
print(f'speeds {speeds.min():.2f}-{speeds.max():.2f} local steps per simulated second '
      f'({speeds.max() / speeds.min():.1f}x apart); one local epoch takes {(steps / speeds).min():.1f}-'
      f'{(steps / speeds).max():.1f} s')'''),
        new_code_cell('''import matplotlib.pyplot as plt
counts = np.stack([np.bincount(data.y_train[i], minlength=10) for i in part.indices])  # (clients, classes)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
bottom = np.zeros(NUM_CLIENTS)
for c in range(10):
    axes[0].bar(np.arange(NUM_CLIENTS), counts[:, c], bottom=bottom, width=1.0, color=plt.cm.tab10(c), label=str(c))
    bottom += counts[:, c]
axes[0].set_xlabel('client'); axes[0].set_ylabel('examples'); axes[0].set_title(f'Dirichlet({ALPHA}) label skew')
axes[0].legend(ncol=10, fontsize=6, loc='upper right', title='digit', title_fontsize=6)
axes[1].bar(np.arange(NUM_CLIENTS), np.sort(speeds), width=1.0, color='gray')
axes[1].set_yscale('log'); axes[1].set_xlabel('client (sorted)'); axes[1].set_ylabel('local steps / simulated s')
axes[1].set_title('log-normal client speeds')
plt.tight_layout(); plt.show()'''),
        new_markdown_cell(
            "## FedAvg, FedBuff and FedAsync\n\n"
            "- **FedAvg**: `SyncRound(10)`: 10 clients a round, the server waits for the slowest one.\n"
            "- **FedBuff**: `Buffer(10)`, 20 clients always in flight: a server step every 10 arrivals, "
            "each freed client replaced at once from the current model.\n"
            "- **FedAsync**: `every_arrival()`: the server mixes in every arrival, with weight "
            "α·(1 + staleness)^-0.5.\n\n"
            "Each method runs for `SIM_TIME` simulated seconds, in compiled chunks of server steps, with the test "
            "accuracy evaluated inside the scan."
        ),
        new_code_cell('''graphdef, params0 = nnx.split(MLP(64, (128,), 10, rngs=nnx.Rngs(0)), nnx.Param)
params0 = nnx.to_pure_dict(params0)
x_test, y_test = jnp.asarray(data.x_test.reshape(len(data.x_test), -1)), jnp.asarray(data.y_test)

def logits(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)

def loss_fn(p, x, y):  # per-example losses
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y)

def eval_fn(p):
    return {'accuracy': (logits(p, x_test).argmax(-1) == y_test).mean()}

local = fl.make_local_update(loss_fn, clients, optax.sgd(0.1), BATCH)
common = dict(num_clients=NUM_CLIENTS, num_examples=part.sizes, local_steps=steps, speeds=speeds)
methods = {  # name: (simulator, server steps per compiled chunk, evaluate every ... server steps)
    'FedAvg': (fl.FederatedSimulator(local, fl.fedavg(1.0), fl.SyncRound(10), **common), 10, 1),
    'FedBuff': (fl.FederatedSimulator(local, fl.fedbuff(1.0), fl.Buffer(10), concurrency=20, **common), 20, 1),
    'FedAsync': (fl.FederatedSimulator(local, fl.fedasync(0.4, 'polynomial', a=0.5), fl.every_arrival(),
                                       concurrency=20, pseudo_gradient='current', **common), 200, 10),
}

def run(sim, chunk, every):
    """Server steps in compiled chunks until SIM_TIME; the records of the steps up to SIM_TIME."""
    state, recs = sim.init(params0, seed=0), []
    while True:
        state, rec = sim.run(state, chunk, eval_fn=eval_fn, eval_every=every)
        recs.append(jax.device_get(rec))
        if recs[-1].time[-1] > SIM_TIME:
            break
    rec = jax.tree.map(lambda *x: np.concatenate(x), *recs)
    return jax.tree.map(lambda x: x[rec.time <= SIM_TIME], rec)

acc0 = float(jax.jit(eval_fn)(params0)['accuracy'])
runs, rows = {}, []
for name, (sim, chunk, every) in methods.items():
    t0 = time.perf_counter()
    rec = run(sim, chunk, every)
    done = ~np.isnan(rec.metrics['accuracy'])
    updates = np.cumsum(rec.num_arrivals)
    runs[name] = r = dict(time=np.r_[0.0, rec.time[done]], updates=np.r_[0, updates[done]],
                          accuracy=np.r_[acc0, rec.metrics['accuracy'][done]], staleness=rec.staleness[rec.mask],
                          step_time=rec.time, step_updates=updates)
    rows.append({'method': name, 'final test accuracy': f"{r['accuracy'][-1]:.3f}", 'client updates': int(updates[-1]),
                 'server updates': int(rec.version[-1]), 'mean staleness': f"{r['staleness'].mean():.2f}",
                 'seconds to simulate': f'{time.perf_counter() - t0:.0f}'})
show_table(rows)

U = int(runs['FedAvg']['step_updates'][-1])
rows = []
for name, r in runs.items():
    k = np.searchsorted(r['step_updates'], U)  # first server step with >= U updates applied
    reached = f"{r['step_time'][k]:.1f}" if k < len(r['step_time']) else 'not reached'
    rows.append({'method': name, f'simulated seconds to apply the first {U} client updates': reached})
show_table(rows)'''),
        new_code_cell('''fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=True)
for name, r in runs.items():
    axes[0].plot(r['time'], r['accuracy'], label=name)
    axes[1].plot(r['updates'], r['accuracy'], label=name)
axes[0].set_xlabel('simulated wall-clock (s)'); axes[1].set_xlabel('client updates applied')
axes[0].set_ylabel('test accuracy')
for ax in axes:
    ax.grid(alpha=0.3); ax.legend()
plt.tight_layout(); plt.show()'''),
        new_markdown_cell(
            "## Staleness\n\n"
            "The staleness of an update is the number of server updates applied between its client's dispatch and "
            "its arrival. FedBuff's buffer keeps it small; FedAsync steps at every arrival, so with 20 clients in "
            "flight an update is typically about 19 versions old."
        ),
        new_code_cell('''fig, axes = plt.subplots(1, 2, figsize=(12, 3))
for ax, name, color in zip(axes, ['FedBuff', 'FedAsync'], ['tab:orange', 'tab:green']):
    s = runs[name]['staleness']
    ax.hist(s, bins=np.arange(s.max() + 2) - 0.5, color=color)
    ax.set_title(f'{name}: staleness of the applied updates (mean {s.mean():.1f})')
    ax.set_xlabel('server updates between dispatch and arrival'); ax.set_ylabel('client updates')
plt.tight_layout(); plt.show()'''),
    ]

def heterogeneity_notebook():
    """Cells of notebooks/06_federated_heterogeneity.ipynb: Dirichlet skew; FedAvg, FedProx, FedSpeed,
    locally Adam-scaled SGD, a curriculum and FedBR on digits."""
    return [
        new_markdown_cell(
            "# Federated learning under label skew\n\n"
            "Clients whose data hold different classes pull the model in different directions (client drift). "
            "This notebook draws Dirichlet label skews on the digits, then trains the same MLP with six client "
            "algorithms of `jaxopt_lab.distributed.federated` in the synchronous simulator:\n\n"
            "- **FedAvg**: local minibatch SGD, the server averages the returned models;\n"
            "- **FedProx** (Li et al. 2020): each local gradient gets μ (w − θ_t);\n"
            "- **FedSpeed** (Sun et al. 2023): a prox-correction kept per client by the server, plus the "
            "gradient at a perturbed point (SAM-like);\n"
            "- **local SGD with Adam-type scaling** (local methods with adaptivity via scaling): a diagonal "
            "preconditioner shared by all clients, refreshed each round from their gradients;\n"
            "- **curriculum** (When do curricula work in FL?): each client visits its easiest examples first "
            "(lowest loss under the received model), the visited prefix growing with linear pacing;\n"
            "- **FedBR** (Guo et al. 2023): pseudo-data (means of training images mixed with local ones) whose "
            "outputs are pushed towards balanced, and whose features are pulled towards the global model's by a "
            "min-max against a discriminator.\n\n"
            "The full comparison (10 methods, 5 seeds, two skews) is `experiments/fed_heterogeneity.toml`; its "
            "table is in the README. Runs on a CPU in a few minutes."
        ),
        new_code_cell(INSTALL),
        new_markdown_cell(
            "## Dirichlet label skew\n\n"
            "`dirichlet_partition` shares out each class among the clients by Dirichlet(α) proportions: with "
            "α = 0.1 most clients hold one or two classes, with α = 1.0 a few, with α = 100 nearly all ten."
        ),
        new_code_cell('''import os, time
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from flax import nnx
from jaxopt_lab.data import load_digits, dirichlet_partition
from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.distributed.local_scaling import local_scaling_server, scaled_local_update
from jaxopt_lab.models import MLP

ROUNDS = int(os.environ.get('NB06_ROUNDS', 150))           # synchronous rounds per method (the test suite runs few)
NUM_CLIENTS = int(os.environ.get('NB06_CLIENTS', 100))
PER_ROUND = int(os.environ.get('NB06_PER_ROUND', 10))      # clients sampled each round
ALPHAS = [float(a) for a in os.environ.get('NB06_ALPHAS', '0.1,1.0').split(',')]  # skews trained on
BATCH, EPOCHS, LR, TARGET = 8, 2, 0.05, 0.85
# the test suite compiles at XLA's lowest backend optimization level (about a third faster to compile)
COMPILER = {'xla_backend_optimization_level': 0} if os.environ.get('NB06_FAST_COMPILE') else None
data = load_digits()
x_train = data.x_train.reshape(len(data.x_train), -1)
parts = {a: dirichlet_partition(data.y_train, NUM_CLIENTS, a, seed=4) for a in sorted({0.1, 1.0, 100.0, *ALPHAS})}
for a, p in parts.items():
    print(f'alpha={a:g}: {p.summary()}')'''),
        new_code_cell('''shown = [0.1, 1.0, 100.0]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.2), sharey=True)
for ax, a in zip(axes, shown):
    counts = parts[a].label_counts                        # (clients, classes)
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    left = np.zeros(NUM_CLIENTS)
    for c in range(10):
        ax.bar(np.arange(NUM_CLIENTS), frac[:, c], bottom=left, width=1.0, color=plt.cm.tab10(c), label=str(c))
        left += frac[:, c]
    ax.set_title(f'Dirichlet({a:g})'); ax.set_xlabel('client')
axes[0].set_ylabel('share of the client\\'s examples')
axes[-1].legend(ncol=1, fontsize=6, loc='center left', bbox_to_anchor=(1, 0.5), title='digit', title_fontsize=6)
plt.tight_layout(); plt.show()
rows = []
for a, p in parts.items():
    counts = p.label_counts
    top = counts.max(1) / np.maximum(counts.sum(1), 1)
    rows.append({'alpha': f'{a:g}', 'classes per client (mean)': f'{(counts > 0).sum(1).mean():.1f}',
                 'largest class share (mean)': f'{top[counts.sum(1) > 0].mean():.2f}',
                 'examples per client (min-max)': f'{p.sizes.min()}-{p.sizes.max()}'})
show_table(rows)'''),
        new_markdown_cell(
            "## Six client algorithms, the same budget\n\n"
            "A 64-128-10 MLP; 10 of the clients each round (`SyncRound`), two local epochs of batch-8 SGD at "
            "learning rate 0.05 (locally scaled SGD: 0.005, as in the config), the test accuracy evaluated every "
            "5 rounds inside the compiled scan. FedSpeed, local scaling and FedBR bring their own client and a "
            "`client_context` (server state sent to the clients: FedSpeed's per-client correction, the shared "
            "preconditioner, FedBR's discriminator). FedBR reads the MLP split into `features` and `head`."
        ),
        new_code_cell('''graphdef, params0 = nnx.split(MLP(64, (128,), 10, rngs=nnx.Rngs(0)), nnx.Param)
params0 = nnx.to_pure_dict(params0)
x_test, y_test = jnp.asarray(data.x_test.reshape(len(data.x_test), -1)), jnp.asarray(data.y_test)

def logits(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)

def loss_fn(p, x, y):  # per-example losses
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y)

def eval_fn(p):
    return {'accuracy': (logits(p, x_test).argmax(-1) == y_test).mean()}

def features(p, x):  # FedBR: the last hidden layer's activations ...
    return nnx.merge(graphdef, nnx.State(p)).features(x)

def head(p, z):      # ... and the last layer
    return nnx.merge(graphdef, nnx.State(p)).head(z)

pseudo = fl.fedbr_pseudo_data(x_train, num=32, per_sample=10, seed=0)  # 32 means of 10 training images

def methods(part):
    """name: (local_update, server rule, client_context or None) on this partition."""
    clients = fl.pad_clients(x_train, data.y_train, part)
    sgd = optax.sgd(LR)
    adam_rule, adam_context = local_scaling_server('adam', beta=0.99, alpha=1e-3)
    return {
        'FedAvg': (fl.make_local_update(loss_fn, clients, sgd, BATCH), fl.fedavg(1.0), None),
        'FedProx (mu 0.1)': (fl.fedprox_local_update(loss_fn, clients, sgd, BATCH, mu=0.1), fl.fedprox(), None),
        'FedSpeed': (fl.fedspeed_local_update(loss_fn, clients, sgd, BATCH, lamb=0.1, rho=0.1),
                     fl.fedspeed(num_clients=NUM_CLIENTS), fl.fedspeed_context),
        'local Adam scaling': (scaled_local_update(loss_fn, clients, LR / 10, BATCH, scaling='adam'),
                               adam_rule, adam_context),
        'curriculum': (fl.make_local_update(loss_fn, clients, sgd, BATCH, curriculum=fl.curriculum('curriculum')),
                       fl.fedavg(1.0), None),
        'FedBR': (fl.fedbr_context_client(fl.fedbr_local_update(features, head, clients, sgd, BATCH, pseudo, num_classes=10)),
                  *fl.fedbr_server(fl.fedbr_discriminator_init(128, jax.random.key(0)))),  # (rule, context)
    }

EVERY = 5
acc0 = float(jax.jit(eval_fn)(params0)['accuracy'])
runs, rows = {}, []
for a in ALPHAS:
    part = parts[a]
    steps = fl.epoch_steps(part.sizes, BATCH, EPOCHS)
    for name, (local, rule, context) in methods(part).items():
        t0 = time.perf_counter()
        sim = fl.FederatedSimulator(local, rule, fl.SyncRound(PER_ROUND), num_clients=NUM_CLIENTS,
                                    num_examples=part.sizes, local_steps=steps, client_context=context,
                                    compiler_options=COMPILER)
        state, rec = sim.run(sim.init(params0, seed=0), ROUNDS, eval_fn=eval_fn, eval_every=EVERY)
        rec = jax.device_get(rec)
        done = ~np.isnan(rec.metrics['accuracy'])
        curve = np.r_[acc0, rec.metrics['accuracy'][done]]
        rounds = np.r_[0, np.arange(1, ROUNDS + 1)[done]]
        runs[a, name] = (rounds, curve)
        hit = np.flatnonzero(curve >= TARGET)
        rows.append({'alpha': f'{a:g}', 'method': name, f'rounds to {TARGET:.0%}': int(rounds[hit[0]]) if hit.size else '-',
                     'final test accuracy': f'{curve[-1]:.3f}', 'best': f'{curve.max():.3f}',
                     'seconds': f'{time.perf_counter() - t0:.1f}'})
show_table(rows)'''),
        new_code_cell('''fig, axes = plt.subplots(1, len(ALPHAS), figsize=(6 * len(ALPHAS), 3.6), squeeze=False, sharey=True)
for ax, a in zip(axes[0], ALPHAS):
    for (alpha, name), (rounds, curve) in runs.items():
        if alpha == a:
            ax.plot(rounds, curve, label=name)
    ax.axhline(TARGET, color='gray', lw=0.8, ls='--')
    ax.set_title(f'Dirichlet({a:g}), {NUM_CLIENTS} clients, {PER_ROUND} a round')
    ax.set_xlabel('round'); ax.grid(alpha=0.3)
axes[0, 0].set_ylabel('test accuracy'); axes[0, 0].legend(fontsize=8)
plt.tight_layout(); plt.show()'''),
        new_markdown_cell(
            "One seed, one data split: the rounds to target move by tens of rounds across simulation seeds "
            "(the README's table gives medians and ranges over 5). There, FedSpeed and locally scaled SGD reach "
            "85% with about half of FedAvg's client updates at α = 0.1, FedProx with μ = 0.1 is indistinguishable "
            "from FedAvg, the easy-first curriculum is slower than FedAvg at both skews, and FedBR needs a little "
            "fewer updates than FedAvg at α = 0.1 (350 vs 400; the same 200 at α = 1.0) and ends about a point "
            "higher at both."
        ),
    ]


SYSTEMS = [
    new_markdown_cell(
        "# Systems: gradient coding, sequential gradient coding, gradient sketching\n\n"
        "1. **Gradient coding** (Tandon et al. 2017): n workers, any s stragglers, the exact full gradient.\n"
        "2. **Sequential gradient coding** (Krishnan et al. 2023): code across rounds too (delay T); simulated "
        "runtime with straggler patterns from the event simulator's speed model.\n"
        "3. **Gradient sketching** (Song et al. 2023): send R g with a shared-seed R; the gradient-matching attack "
        "still recovers the private input from the sketch, Gaussian DP noise defeats it.\n"
        "4. **DADAO** (Nabli & Oyallon 2023): asynchronous decentralized accelerated optimization over Poisson events."
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        "import itertools, os\n"
        "import jax, jax.numpy as jnp, numpy as np, optax\n"
        "import matplotlib.pyplot as plt\n"
        "from jaxopt_lab.distributed import gradient_code, decoding_vector, plain_gc, selective_repetition, "
        "multiplexed, unit_times, wait_for_all\n"
        "from jaxopt_lab.distributed.compression import sketch, identity, dp_sigma\n"
        "from jaxopt_lab.data import load_digits\n\n"
        "JOBS = int(os.environ.get('NB07_JOBS', 200))            # the test suite runs fewer\n"
        "ATTACK_STEPS = int(os.environ.get('NB07_ATTACK_STEPS', 1000))\n"
        "IMAGES = int(os.environ.get('NB07_IMAGES', 4))"
    ),
    new_markdown_cell("## 1. Gradient coding: every straggler pattern up to s decodes to the full gradient"),
    new_code_cell(
        "rows = []\n"
        "for kind, n, s in [('cyclic', 6, 2), ('fractional', 6, 2), ('cyclic', 8, 3)]:\n"
        "    code = gradient_code(kind, n, s)\n"
        "    g = np.random.default_rng(0).normal(size=(n, 5))   # the n partitions' gradients\n"
        "    sent = code.B @ g                                   # what each worker sends\n"
        "    ok = total = 0\n"
        "    for k in range(s + 1):\n"
        "        for dead in itertools.combinations(range(n), k):\n"
        "            alive = np.ones(n, bool); alive[list(dead)] = False\n"
        "            a = decoding_vector(code, alive)\n"
        "            ok += int(a is not None and np.allclose(a @ sent, g.sum(0)))\n"
        "            total += 1\n"
        "    rows.append({'code': kind, 'n': n, 's': s, 'load / worker': f'{code.load:.3f}',\n"
        "                 'patterns decoded exactly': f'{ok} / {total}'})\n"
        "show_table(rows)"
    ),
    new_markdown_cell(
        "## 2. Sequential gradient coding: simulated runtime\n\n"
        "16 workers; per-round times from `unit_times` (log-normal speeds, per-round jitter, 2-round bursts 5x "
        "slower). The master ends a round when n - λ workers returned and the job at its deadline decodes."
    ),
    new_code_cell(
        "n = 16\n"
        "u = unit_times(n, JOBS + 2, seed=0)\n"
        "schemes = {'wait for all': wait_for_all(n), 'GC s=1': plain_gc(n, 1), 'GC s=2': plain_gc(n, 2),\n"
        "           'SR-SGC s=0 T=2 λ=2': selective_repetition(n, 0, delay=2, stragglers_per_round=2),\n"
        "           'M-SGC s=1 T=2 λ=2 rep=0.5': multiplexed(n, 1, delay=2, rep_fraction=0.5, stragglers_per_round=2)}\n"
        "results = {k: sch.run(JOBS, unit_time=u) for k, sch in schemes.items()}\n"
        "base = results['wait for all'].total_time\n"
        "show_table([{'scheme': k, 'simulated time': f'{r.total_time:.2f}',\n"
        "             'saved vs wait-all': f'{100 * (1 - r.total_time / base):+.1f}%',\n"
        "             'jobs late': int(np.sum(r.decoded_round > np.arange(JOBS) + schemes[k].delay))}\n"
        "            for k, r in results.items()])\n"
        "for k, r in results.items():\n"
        "    plt.plot(np.cumsum(r.round_times), label=k)\n"
        "plt.xlabel('round'); plt.ylabel('cumulative simulated time'); plt.legend(); plt.show()"
    ),
    new_markdown_cell(
        "## 3. Sketching: bytes, unbiasedness, and the gradient-leakage attack\n\n"
        "A worker sends the Gaussian sketch (25% of the rows) of one private digit's gradient of a 64-32-10 "
        "MLP. The server knows the seed, hence R, and matches sketched gradients of a candidate image "
        "(Adam from a random start)."
    ),
    new_code_cell(
        "def init_mlp(key, sizes=(64, 32, 10)):\n"
        "    return [{'w': jax.random.normal(jax.random.fold_in(key, i), (a, b)) / jnp.sqrt(a), 'b': jnp.zeros((b,))}\n"
        "            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]\n\n"
        "def loss_fn(params, x, y_soft):\n"
        "    h = x\n"
        "    for i, layer in enumerate(params):\n"
        "        h = h @ layer['w'] + layer['b']\n"
        "        h = jax.nn.sigmoid(h) if i < len(params) - 1 else h\n"
        "    return -jnp.sum(y_soft * jax.nn.log_softmax(h))\n\n"
        "params = init_mlp(jax.random.key(0))\n"
        "step = jnp.int32(0)\n"
        "for name, c in [('dense', identity()), ('sketch 0.25', sketch('gaussian', 0.25, seed=1))]:\n"
        "    print(name, 'bytes:', int(c.compress(params, c.init(params), jax.random.key(0), step)[2]))\n"
        "# unbiased: the mean of R^T R x over many shared-seed steps approaches x\n"
        "x = {'v': jnp.linspace(-1, 1, 50)}\n"
        "c = sketch('srht', 0.2, seed=0)\n"
        "dec = jax.vmap(lambda t: c.compress(x, (), jax.random.key(0), t)[0]['v'])(jnp.arange(2000))\n"
        "print('max |mean(R^T R x) - x| over 2000 steps:', float(jnp.abs(dec.mean(0) - x['v']).max()))"
    ),
    new_code_cell(
        "data = load_digits()\n"
        "xs = jnp.asarray(data.x_test[:IMAGES].reshape(IMAGES, 64))\n"
        "ys = jax.nn.one_hot(jnp.asarray(data.y_test[:IMAGES]), 10)\n"
        "C, EPS, DELTA = 1.0, 0.9, 1e-5\n"
        "settings = {\n"
        "    'sketch 0.25': (sketch('gaussian', 0.25, seed=1), sketch('gaussian', 0.25, seed=1)),\n"
        "    f'sketch + DP (sigma={dp_sigma(EPS, DELTA, C):.2f})': (\n"
        "        sketch('gaussian', 0.25, seed=1, dp=(EPS, DELTA), clip_norm=C), sketch('gaussian', 0.25, seed=1, clip_norm=C)),\n"
        "}\n\n"
        "def attack(sender, attacker, x, y, key):\n"
        "    g = jax.grad(loss_fn)(params, x, y)\n"
        "    received = sender.compress(g, (), jax.random.fold_in(key, 7), step)[0]\n"
        "    def match(z):\n"
        "        gp = jax.grad(loss_fn)(params, jax.nn.sigmoid(z['x']), jax.nn.softmax(z['y']))\n"
        "        dec = attacker.compress(gp, (), key, step)[0]\n"
        "        return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(received)))\n"
        "    opt = optax.adam(0.05)\n"
        "    z = {'x': jax.random.normal(key, (64,)), 'y': jax.random.normal(jax.random.fold_in(key, 1), (10,))}\n"
        "    def body(carry, _):\n"
        "        z, s = carry\n"
        "        u, s = opt.update(jax.grad(match)(z), s, z)\n"
        "        return (optax.apply_updates(z, u), s), None\n"
        "    (z, _), _ = jax.lax.scan(body, (z, opt.init(z)), None, length=ATTACK_STEPS)\n"
        "    return jax.nn.sigmoid(z['x'])\n\n"
        "keys = jax.random.split(jax.random.key(42), IMAGES)\n"
        "recs, rows = {}, []\n"
        "for name, (sender, attacker) in settings.items():\n"
        "    recs[name] = jax.jit(jax.vmap(lambda x, y, k: attack(sender, attacker, x, y, k)))(xs, ys, keys)\n"
        "    rows.append({'what is sent': name, 'reconstruction MSE': f'{float(jnp.mean((recs[name] - xs) ** 2)):.4f}'})\n"
        "rows.append({'what is sent': 'guess: mean digit',\n"
        "             'reconstruction MSE': f'{float(jnp.mean((data.x_train.reshape(-1, 64).mean(0) - xs) ** 2)):.4f}'})\n"
        "show_table(rows)\n"
        "fig, axes = plt.subplots(3, IMAGES, figsize=(1.2 * IMAGES, 3.8))\n"
        "for j in range(IMAGES):\n"
        "    for i, img in enumerate([xs[j]] + [r[j] for r in recs.values()]):\n"
        "        axes[i, j].imshow(np.asarray(img).reshape(8, 8), cmap='gray_r', vmin=0, vmax=1)\n"
        "        axes[i, j].set_xticks([]); axes[i, j].set_yticks([])\n"
        "for i, t in enumerate(['private'] + list(recs)):\n"
        "    axes[i, 0].set_ylabel(t.split(' (')[0], fontsize=7)\n"
        "plt.tight_layout(); plt.show()"
    ),
    new_markdown_cell(
        "## 4. DADAO: asynchronous decentralized accelerated optimization\n\n"
        "Local least squares on a ring of 8 nodes; gradient events at Poisson rate n, edge communications at "
        "rate sqrt(2 chi_1 chi_2), played in order by a `lax.scan` (the official code's rules)."
    ),
    new_code_cell(
        "from jaxopt_lab.distributed import dadao_events, graph_constants, graph_edges, run_dadao\n\n"
        "DADAO_T = float(os.environ.get('NB07_DADAO_T', 300))\n"
        "nn, d, m = 8, 3, 10\n"
        "rng = np.random.default_rng(0)\n"
        "Dm = rng.normal(size=(nn, m, d)); bm = Dm @ rng.normal(size=d) + 0.3 * rng.normal(size=(nn, 1))\n"
        "x_star = np.linalg.solve(sum(Dm[i].T @ Dm[i] for i in range(nn)), sum(Dm[i].T @ bm[i] for i in range(nn)))\n"
        "eigs = [np.linalg.eigvalsh(2 / m * Dm[i].T @ Dm[i]) for i in range(nn)]\n"
        "mu, L = min(e[0] for e in eigs), max(e[-1] for e in eigs)\n"
        "edges = graph_edges('ring', nn)\n"
        "chi_1, chi_2, lamb_mix = graph_constants(nn, edges)\n"
        "events = dadao_events(nn, edges, DADAO_T, seed=0)\n"
        "Dj, bj = jnp.asarray(Dm, jnp.float32), jnp.asarray(bm, jnp.float32)\n"
        "grad_fn = lambda i, x: 2 / m * Dj[i].T @ (Dj[i] @ x - bj[i])\n"
        "_, err = jax.jit(lambda x: run_dadao(grad_fn, x, events, mu, L, chi_1 / lamb_mix, x_star))(jnp.zeros((nn, d)))\n"
        "err = np.asarray(err) / np.sum(x_star ** 2)\n"
        "show_table([{'events': len(events.times), 'gradients': int(events.is_grad.sum()),\n"
        "             'communications': int((~events.is_grad).sum()), 'relative error at start': f'{1.0:.1e}',\n"
        "             'relative error at the end': f'{err[-1]:.1e}'}])\n"
        "plt.semilogy(np.cumsum(events.is_grad), err); plt.xlabel('local gradients'); plt.ylabel('mean ||x_i - x*||^2 / ||x*||^2')\n"
        "plt.show()"
    ),
]


NOTEBOOKS = {
    "00_quickstart.ipynb": lambda: QUICKSTART,
    "01_diloco.ipynb": lambda: DILOCO,
    "02_federated.ipynb": federated_notebook,
    "03_lowrank.ipynb": lowrank_notebook,
    "04_kernels.ipynb": lambda: KERNELS,
    "05_optimizers_and_sharpness.ipynb": lambda: SHARPNESS,
    "06_federated_heterogeneity.ipynb": heterogeneity_notebook,
    "07_systems.ipynb": lambda: SYSTEMS,
}

if __name__ == "__main__":
    # python scripts/make_notebooks.py [--execute] [NAME ...]: only those (all by default)
    args = sys.argv[1:]
    run = "--execute" in args
    names = [a for a in args if a != "--execute"] or list(NOTEBOOKS)
    if "/OWNER/" in REPOSITORY_URL:
        print(f"note: {REPOSITORY_URL} is a placeholder (pyproject.toml [project.urls]): the badges and the "
              "install cells point there until it is set", file=sys.stderr)
    for name in names:
        write(name, NOTEBOOKS[name](), run=run)
