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
        "# Systems: gradient coding, sequential gradient coding, gradient sketching, DADAO, DiPaCo\n\n"
        "1. **Gradient coding** (Tandon et al. 2017): n workers, any s stragglers, the exact full gradient.\n"
        "2. **Sequential gradient coding** (Krishnan et al. 2023): code across rounds too (delay T); simulated "
        "runtime with straggler patterns from the event simulator's speed model.\n"
        "3. **Gradient sketching** (Song et al. 2023): send R g with a shared-seed R; the gradient-matching attack "
        "still recovers the private input from the sketch, Gaussian DP noise defeats it.\n"
        "4. **DADAO** (Nabli & Oyallon 2023): asynchronous decentralized accelerated optimization over Poisson events.\n"
        "5. **DiPaCo** (Douillard et al. 2024): paths of shared modules, one per worker, each module synchronized "
        "DiLoCo-style among the workers whose paths hold it."
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
        "IMAGES = int(os.environ.get('NB07_IMAGES', 4))\n"
        "DIPACO_STEPS = int(os.environ.get('NB07_DIPACO_STEPS', 300))"
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
        "slower). The master ends a round when n - λ workers returned and the job at its deadline decodes; for "
        "M-SGC (the paper's layout for the (B, W, λ)-bursty straggler model: at most λ stragglers in any W rounds, "
        "bursts of at most B; delay T = W - 2 + B) at the earliest time the workers still running keep the pattern "
        "in that model."
    ),
    new_code_cell(
        "n = 16\n"
        "u = unit_times(n, JOBS + 2, seed=0)\n"
        "schemes = {'wait for all': wait_for_all(n), 'GC s=1': plain_gc(n, 1), 'GC s=2': plain_gc(n, 2),\n"
        "           'SR-SGC s=0 T=2 λ=2': selective_repetition(n, 0, delay=2, stragglers_per_round=2),\n"
        "           'M-SGC B=1 W=3 λ=2 (T=2)': multiplexed(n, 1, 3, 2)}\n"
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
    new_markdown_cell(
        "## 5. DiPaCo: paths of shared modules\n\n"
        "A toy with what DiPaCo needs: inputs of 4 kinds (the signs of two input coordinates, the router's fixed "
        "feature), each kind with its own target function. The model is an embedding shared by every path and 2 "
        "levels of 2 modules: 4 paths, one per worker, each trained on its kind's inputs. Every H = 10 steps a "
        "module's outer gradient is averaged over the 2 workers holding it, the embedding's over all 4 "
        "(`jaxopt_lab.dipaco`). Against it, dense DiLoCo on the same 4 workers and batches with a model of one "
        "path's size. At test time each input goes through its router's path. "
        "(`scripts/dipaco_lm.py` runs the same comparison on the byte-level GPT: README, *DiPaCo*.)"
    ),
    new_code_cell(
        "from jaxopt_lab import dipaco, diloco\n"
        "from jaxopt_lab.distributed import WorkerRunner, grid_paths, module_bytes, wire_bytes\n\n"
        "rng = np.random.default_rng(0)\n"
        "din, hid, H, W, BATCH = 8, 16, 10, 4, 32\n"
        "teachers = [(rng.normal(size=(din, hid)) / np.sqrt(din), rng.normal(size=hid) / np.sqrt(hid)) for _ in range(4)]\n\n"
        "def sample(n, rng):\n"
        "    x = rng.normal(size=(n, din))\n"
        "    kind = 2 * (x[:, 0] > 0) + (x[:, 1] > 0)   # the router: a fixed feature of the input\n"
        "    y = np.stack([np.tanh(x @ a) @ b for a, b in teachers], 1)[np.arange(n), kind]\n"
        "    return x.astype(np.float32), y.astype(np.float32), kind\n\n"
        "paths = grid_paths(2, 2)          # worker w trains path w = (module of level 0, module of level 1)\n"
        "params = {'embed': jnp.asarray(rng.normal(size=(din, hid)) / np.sqrt(din), jnp.float32),   # every path\n"
        "          'block0': jnp.asarray(rng.normal(size=(hid, hid)) / np.sqrt(hid), jnp.float32),  # level 0\n"
        "          'block1': jnp.asarray(rng.normal(size=(hid, 1)) / np.sqrt(hid), jnp.float32)}    # level 1\n"
        "levels = {'embed': -1, 'block0': 0, 'block1': 1}   # -1: shared by all paths\n\n"
        "def predict(p, x):\n"
        "    return (jnp.tanh(jnp.tanh(x @ p['embed']) @ p['block0']) @ p['block1'])[:, 0]\n\n"
        "def mse(p, x, y):\n"
        "    return jnp.mean((predict(p, x) - y) ** 2)\n\n"
        "steps = max(H, DIPACO_STEPS - DIPACO_STEPS % H)\n"
        "xs, ys, kinds = sample(6 * steps * W * BATCH, np.random.default_rng(1))\n"
        "shards = [np.flatnonzero(kinds == w)[:steps * BATCH].reshape(steps, BATCH) for w in range(W)]  # worker w: kind w\n"
        "bx, by = np.stack([xs[i] for i in shards], 1), np.stack([ys[i] for i in shards], 1)   # (steps, W, BATCH, ...)\n"
        "xv, yv, kv = sample(512, np.random.default_rng(2))\n"
        "runner = WorkerRunner(W)\n\n"
        "def train(tx):\n"
        "    def step(p, s, x, y, sync=None):\n"
        "        u, s = tx.update(jax.grad(mse)(p, x, y), s, p, sync=sync)\n"
        "        return optax.apply_updates(p, u), s\n"
        "    mapped = runner.map_sync(step)\n"
        "    p, s = runner.put(runner.replicate((params, tx.init(params))))\n"
        "    errors = jax.jit(jax.vmap(lambda q: (predict(q, xv) - yv) ** 2))   # (W, N): every path on every input\n"
        "    curve = []\n"
        "    for i in range(steps):\n"
        "        p, s = mapped(p, s, jnp.asarray(bx[i]), jnp.asarray(by[i]))\n"
        "        if (i + 1) % H == 0:\n"
        "            err = np.asarray(errors(p))\n"
        "            curve.append(err[kv, np.arange(len(kv))].mean())   # each input through its router's path\n"
        "    return runner.get(s), curve, err\n\n"
        "inner, outer = optax.adam(3e-3), optax.sgd(0.7, momentum=0.9, nesterov=True)\n"
        "s_dip, c_dip, err_dip = train(dipaco(paths, levels, inner, outer, sync_every=H, axis_name=runner.axis_name))\n"
        "s_dil, c_dil, _ = train(diloco(inner, outer, sync_every=H, axis_name=runner.axis_name))\n"
        "random_path = np.random.default_rng(3).integers(W, size=len(kv))\n"
        "show_table([{'run': \"DiPaCo 2x2, the router's path\", 'val MSE': f'{c_dip[-1]:.4f}',\n"
        "             'wire bytes': int(wire_bytes(s_dip).sum())},\n"
        "            {'run': 'DiPaCo 2x2, a random path', 'val MSE': f'{err_dip[random_path, np.arange(len(kv))].mean():.4f}',\n"
        "             'wire bytes': int(wire_bytes(s_dip).sum())},\n"
        "            {'run': \"dense DiLoCo, one path's size\", 'val MSE': f'{c_dil[-1]:.4f}',\n"
        "             'wire bytes': int(wire_bytes(s_dil).sum())}])\n"
        "show_table([{'module': str(k), 'workers': v['workers'], 'payload bytes': int(v['payload']), 'wire bytes': int(v['wire'])}\n"
        "            for k, v in module_bytes(s_dip, paths).items()])\n"
        "rounds = np.arange(1, len(c_dip) + 1) * H\n"
        "plt.plot(rounds, c_dip, 'o-', label='DiPaCo 2x2'); plt.plot(rounds, c_dil, 'o-', label=\"dense DiLoCo, one path's size\")\n"
        "plt.yscale('log'); plt.xlabel('inner steps'); plt.ylabel('validation MSE'); plt.legend(); plt.show()"
    ),
    new_markdown_cell(
        "Each path specializes to its kind of input, which the dense model of one path's size must fit all at "
        "once; a random path per input is worse than either. DiPaCo's wire bytes are lower too: a module is "
        "all-reduced among its 2 holders only (a ring of 2 sends it once), the embedding among all 4. On the "
        "byte-level text, where the router's feature separates the data much less, the gain did not show "
        "(README, *DiPaCo*)."
    ),
]



FINETUNING = [
    new_markdown_cell(
        "# Parameter-efficient fine-tuning: LoRA, LoRA-Pro, LoRA-GGPO\n\n"
        "`jaxopt_lab.finetune` adapts a pretrained model with low-rank adapters: `apply_lora` swaps the chosen "
        "`nnx.Linear` layers for `LoRALinear` (`W + (α/r) A B`, B = 0 at the start, so the model is unchanged), "
        "`freeze_base` trains only the factors (zero updates and no optimizer state for the rest), "
        "`merge_lora` / `unmerge_lora` fold the adapters in and out. The gradient rules are optax transforms: "
        "`lora_pro` (Wang et al. 2025: the factor gradients whose low-rank step best matches full fine-tuning) "
        "and `lora_ggpo` (Chang et al. 2025: a gradient- and weight-norm-guided perturbation of the frozen "
        "kernels around any inner method).\n\n"
        "Here: the `nano` GPT pretrained on Python's documentation, then fine-tuned on Python source code "
        "(shrunk from `experiments/pretrain_gpt_docs.toml` → `experiments/finetune_gpt_code.toml`) "
        "with LoRA, LoRA-Pro, LoRA-GGPO and full fine-tuning. Runs on a CPU in a few minutes."
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        "import os, time\n"
        "import jax, jax.numpy as jnp, numpy as np, optax\n"
        "import matplotlib.pyplot as plt\n"
        "from flax import nnx\n"
        "from jaxopt_lab.data import load_python_code, load_text\n"
        "from jaxopt_lab.finetune import (apply_lora, freeze_base, lora_ggpo, lora_pro, merge_lora,\n"
        "                                 remove_perturbation, trainable_report, unmerge_lora)\n"
        "from jaxopt_lab.models import GPT\n\n"
        "PRESET = os.environ.get('NB08_PRESET', 'nano')              # the test suite runs 'micro'\n"
        "PRETRAIN = int(os.environ.get('NB08_PRETRAIN_STEPS', 200))  # pretraining steps on the docs\n"
        "FINETUNE = int(os.environ.get('NB08_FINETUNE_STEPS', 100))  # fine-tuning steps on code\n"
        "BATCH, CONTEXT = 32, 64\n"
        "docs, code = load_text(context=CONTEXT), load_python_code(context=CONTEXT)\n"
        "print(f'docs: {docs.train.size:,} training bytes; code: {code.train.size:,} training bytes; {jax.devices()}')\n\n"
        + TABLE
    ),
    new_markdown_cell("## Pretrain on the documentation"),
    new_code_cell(
        "def ce(model, x, y):\n"
        "    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()\n\n"
        "@nnx.jit\n"
        "def eval_loss(model, x, y):\n"
        "    return ce(model, x, y)\n\n"
        "def validation_loss(model, corpus, batches=10):\n"
        "    return float(np.mean([eval_loss(model, x, y) for x, y in corpus.eval_batches(BATCH, max_batches=batches)\n"
        "                          if x.shape[0] == BATCH]))\n\n"
        "def train(model, tx, corpus, steps, seed=0, wrt=nnx.Param, every=None):\n"
        "    optimizer = nnx.Optimizer(model, tx, wrt=wrt)\n\n"
        "    @nnx.jit\n"
        "    def step(model, optimizer, x, y):\n"
        "        loss, grads = nnx.value_and_grad(ce)(model, x, y)\n"
        "        optimizer.update(model, grads)\n"
        "        return loss\n\n"
        "    curve, t0 = [(0, validation_loss(model, corpus))], None\n"
        "    for t in range(steps):\n"
        "        if t == 1:\n"
        "            t0 = time.perf_counter()  # after compiling\n"
        "        step(model, optimizer, *corpus.batch(t, BATCH, seed))\n"
        "        if every and ((t + 1) % every == 0 or t + 1 == steps):\n"
        "            curve.append((t + 1, validation_loss(model, corpus)))\n"
        "    rate = (steps - 1) / (time.perf_counter() - t0) if steps > 1 else float('nan')\n"
        "    return optimizer, curve, rate\n\n"
        "base = GPT.from_preset(PRESET, context=CONTEXT, rngs=nnx.Rngs(0))\n"
        "schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, PRETRAIN // 10), PRETRAIN, 3e-4)\n"
        "_, pre_curve, _ = train(base, optax.adamw(schedule, b2=0.95, weight_decay=0.1), docs, PRETRAIN)\n"
        "pretrained = nnx.state(base, nnx.Param)  # the checkpoint every variant starts from\n"
        "show_table([{'pretrained GPT': PRESET, 'steps': PRETRAIN, 'docs val loss': f'{validation_loss(base, docs):.3f}',\n"
        "             'code val loss (before fine-tuning)': f'{validation_loss(base, code):.3f}'}])"
    ),
    new_markdown_cell(
        "## Adapters: what trains, what it costs, merging\n\n"
        "LoRA rank 8, α = 16 (scale α/r = 2) on every attention and MLP projection of every block. "
        "The trainable parameters are the factors; Adam's state follows them (two moments each), while full "
        "fine-tuning holds two moments of every parameter."
    ),
    new_code_cell(
        "RANK, ALPHA, TARGETS = 8, 16.0, 'blocks/.*/(qkv|attn_out|mlp_in|mlp_out)'\n\n"
        "def fresh(lora=True):\n"
        "    model = GPT.from_preset(PRESET, context=CONTEXT, rngs=nnx.Rngs(0))\n"
        "    nnx.update(model, pretrained)\n"
        "    if lora:\n"
        "        apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))\n"
        "    return model\n\n"
        "def state_bytes(optimizer):\n"
        "    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))\n\n"
        "model = fresh()\n"
        "report = trainable_report(nnx.state(model, nnx.Param))\n"
        "x, y = code.batch(0, BATCH, 0)\n"
        "before = np.asarray(base(x))\n"
        "print('adapted layers: B = 0 at the start, the outputs equal the pretrained model\\'s:',\n"
        "      np.allclose(np.asarray(model(x)), before, atol=1e-5))\n"
        "show_table([{'parameters': f\"{report['params']:,}\", 'trainable (adapters)': f\"{report['trainable_params']:,}\",\n"
        "             'trainable share': f\"{report['trainable_params'] / report['params']:.1%}\",\n"
        "             'trainable bytes': f\"{report['trainable_bytes']:,}\"}])"
    ),
    new_markdown_cell("## Fine-tune on code: four variants from the same checkpoint"),
    new_code_cell(
        "SCALE = ALPHA / RANK\n"
        "variants = {\n"
        "    'LoRA (AdamW 1e-3)': (True, freeze_base(optax.adamw(1e-3, weight_decay=0.0))),\n"
        "    'LoRA-Pro (AdamW form, 1e-3)': (True, freeze_base(lora_pro(1e-3, scale=SCALE, mode='adamw'))),\n"
        "    'LoRA-GGPO (around AdamW 1e-3)': (True, lora_ggpo(freeze_base(optax.adamw(1e-3, weight_decay=0.0)), scale=SCALE)),\n"
        "    'full fine-tuning (AdamW 3e-4)': (False, optax.adamw(3e-4, weight_decay=0.0)),\n"
        "}\n"
        "results, curves = [], {}\n"
        "for name, (lora, tx) in variants.items():\n"
        "    model = fresh(lora)\n"
        "    optimizer, curve, rate = train(model, tx, code, FINETUNE, seed=1, every=max(1, FINETUNE // 5))\n"
        "    if 'GGPO' in name:  # the kernels hold GGPO's perturbation: evaluate the clean ones\n"
        "        opt_state = jax.tree.map(lambda v: v.get_value(), optimizer.opt_state, is_leaf=lambda v: isinstance(v, nnx.Variable))\n"
        "        nnx.update(model, remove_perturbation(nnx.state(model, nnx.Param), opt_state))\n"
        "        curve[-1] = (FINETUNE, validation_loss(model, code))\n"
        "    curves[name] = curve\n"
        "    params = nnx.state(model, nnx.Param)\n"
        "    trainable = trainable_report(params)['trainable_params'] if lora else trainable_report(params)['params']\n"
        "    results.append({'variant': name, 'code val loss': f'{curve[-1][1]:.3f}',\n"
        "                    'docs val loss': f'{validation_loss(model, docs):.3f}',\n"
        "                    'trainable params': f'{trainable:,}', 'optimizer state bytes': f'{state_bytes(optimizer):,}',\n"
        "                    'steps/s': f'{rate:.1f}'})\n"
        "    if name.startswith('LoRA ('):\n"
        "        lora_model = model\n"
        "show_table(results)"
    ),
    new_markdown_cell(
        "LoRA-Pro's AdamW form keeps Adam's moments of the *full-size* equivalent gradient (as the official "
        "code does), so its optimizer state is that of full fine-tuning; plain LoRA's follows the factors.\n\n"
        "## Merging: one matmul per layer at inference\n\n"
        "`merge_lora` folds `(α/r) A B` into each kernel (the forward then adds nothing); `unmerge_lora` "
        "takes it back out (up to float rounding)."
    ),
    new_code_cell(
        "out = np.asarray(lora_model(x))\n"
        "kernel = np.asarray(lora_model.blocks[0].qkv.kernel[...])\n"
        "merge_lora(lora_model)\n"
        "merged_out = np.asarray(lora_model(x))\n"
        "unmerge_lora(lora_model)\n"
        "show_table([{'max abs(merged − adapter) output': f'{np.abs(merged_out - out).max():.2e}',\n"
        "             'max abs(unmerged − original) kernel': f'{np.abs(np.asarray(lora_model.blocks[0].qkv.kernel[...]) - kernel).max():.2e}',\n"
        "             'max abs(fine-tuned − pretrained) output': f'{np.abs(out - before).max():.2e}'}])"
    ),
    new_code_cell(
        "plt.figure(figsize=(6, 3.5))\n"
        "for name, curve in curves.items():\n"
        "    plt.plot(*zip(*curve), 'o-', label=name)\n"
        "plt.xlabel('fine-tuning step'); plt.ylabel('code validation loss (nats/byte)'); plt.legend(fontsize=8)\n"
        "plt.grid(alpha=0.3); plt.show()"
    ),
    new_markdown_cell(
        "The same runs as configs: `jaxopt-lab run experiments/finetune_gpt_code.toml` (pretrains "
        "`experiments/pretrain_gpt_docs.toml` first when its run is missing; `model.init_from` and "
        "`model.lora` are the keys)."
    ),
]


DYNAMICS = [
    new_markdown_cell(
        "# Training dynamics: first-layer preconditioning, surrogates, backprop-free training, batch size, "
        "instability monitors\n\n"
        "A tour of the training-dynamics methods of jaxopt_lab on small problems (digits, synthetic logistic "
        "regression, a byte-level GPT), each with a table and a plot:\n\n"
        "1. **TrAct** (`scale_by_tract`): the first layer's gradient preconditioned by its input's second moment.\n"
        "2. **SSO** (`scale_by_sso`): several cheap surrogate steps per expensive gradient.\n"
        "3. **tpSGD** (`tpsgd`): hidden layers trained by random target projections, no backward pass.\n"
        "4. **Gradient-normalized smoothness** (`scale_by_gradient_normalized_smoothness`): a gradient-regularized "
        "Newton step with an adaptive search.\n"
        "5. **Ghost batch norm + batch-size scaling** (`GhostBatchNorm`, `jaxopt_lab.schedules`): the large-batch "
        "generalization gap and what closes it.\n"
        "6. **Instability proxies** (`jaxopt_lab.diagnostics.instability_metrics`): attention-logit growth and "
        "output log Z of small GPTs across learning rates, with and without qk-layernorm + z-loss.\n"
        "7. **Opposing signals** (`jaxopt_lab.diagnostics.opposing_signals`): paired outlier groups whose losses "
        "oscillate against each other at the edge of stability.\n\n"
        "The full-size versions are the scripts `scripts/tract_digits.py`, `sso_logistic.py`, `tpsgd_digits.py`, "
        "`gns_logistic.py`, `large_batch_gap.py`, `lr_vs_batch.py`, `instability_proxies.py`, `opposing_signals.py`. "
        "Runs on a CPU in a few minutes."
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        "import math, os\n"
        "import jax, jax.numpy as jnp, numpy as np, optax\n"
        "import matplotlib.pyplot as plt\n"
        "from flax import nnx\n"
        "import jaxopt_lab\n"
        "from jaxopt_lab.data import load_digits, load_text, logistic_regression\n"
        "from jaxopt_lab.models import GPT, MLP, GhostBatchNorm\n\n"
        "EPOCHS = int(os.environ.get('NB09_EPOCHS', 5))    # digits epochs (the test suite runs fewer)\n"
        "STEPS = int(os.environ.get('NB09_STEPS', 200))    # optimizer steps of the other sections\n"
        "digits = load_digits()\n"
        "x_train, y_train, x_test, y_test = map(jnp.asarray, (digits.x_train, digits.y_train, digits.x_test, digits.y_test))\n"
        "print(f'digits: {x_train.shape[0]} train / {x_test.shape[0]} test images {x_train.shape[1:]}; {jax.devices()}')\n\n"
        + TABLE
    ),
    # --- TrAct
    new_markdown_cell(
        "## 1. TrAct: the first layer's update as if the inputs were whitened\n\n"
        "TrAct (Petersen et al. 2024) replaces the first layer's kernel gradient `g` by `(XᵀX/N + λI)⁻¹ g` "
        "(X: the layer's input batch, passed to `update` as `first_layer_input`); every other leaf passes "
        "unchanged. Same initialization, batches and learning rate with and without it, an MLP on digits."
    ),
    new_code_cell(
        "from jaxopt_lab.transforms.tract import scale_by_tract\n\n"
        "def train_digits(make_tx, epochs=EPOCHS, batch=32, seed=0, tract=False):\n"
        "    graphdef, params = nnx.split(MLP(64, (128,), 10, rngs=nnx.Rngs(seed)), nnx.Param)\n"
        "    tx = make_tx()\n"
        "    state = tx.init(params)\n\n"
        "    def loss_fn(p, x, y):\n"
        "        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()\n\n"
        "    @jax.jit\n"
        "    def step(p, s, x, y):\n"
        "        g = jax.grad(loss_fn)(p, x, y)\n"
        "        extra = {'first_layer_input': x.reshape(x.shape[0], -1)} if tract else {}\n"
        "        u, s = tx.update(g, s, p, **extra)\n"
        "        return optax.apply_updates(p, u), s\n\n"
        "    accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(nnx.merge(graphdef, p)(x_test), -1) == y_test))\n"
        "    n = x_train.shape[0] // batch * batch\n"
        "    accs = []\n"
        "    for epoch in range(epochs):\n"
        "        for idx in np.random.default_rng([seed, epoch]).permutation(x_train.shape[0])[:n].reshape(-1, batch):\n"
        "            params, state = step(params, state, x_train[idx], y_train[idx])\n"
        "        accs.append(float(accuracy(params)))\n"
        "    return accs\n\n"
        "tract_runs = {}\n"
        "for name, make in [('SGD (lr 0.01, momentum 0.9)', lambda: optax.sgd(0.01, momentum=0.9)),\n"
        "                   ('Adam (lr 1e-3)', lambda: optax.adam(1e-3))]:\n"
        "    tract_runs[name] = train_digits(make)\n"
        "    tract_runs[name + ' + TrAct'] = train_digits(lambda: optax.chain(scale_by_tract('layers/0/kernel', l=0.1), make()),\n"
        "                                                 tract=True)\n"
        "show_table([{'optimizer': k, 'test accuracy, epoch 1': f'{v[0]:.3f}', f'epoch {EPOCHS}': f'{v[-1]:.3f}'}\n"
        "            for k, v in tract_runs.items()])"
    ),
    new_code_cell(
        "plt.figure(figsize=(6, 3.5))\n"
        "for k, v in tract_runs.items():\n"
        "    plt.plot(range(1, len(v) + 1), v, '--' if 'TrAct' in k else '-', label=k)\n"
        "plt.xlabel('epoch'); plt.ylabel('test accuracy'); plt.legend(fontsize=8); plt.grid(alpha=0.3); plt.show()"
    ),
    # --- SSO
    new_markdown_cell(
        "## 2. SSO: many cheap surrogate steps per expensive gradient\n\n"
        "Target-based surrogate optimization (Lavington et al. 2023): with the model's outputs `z = f(θ)` as "
        "targets, one *expensive* gradient `∂L/∂z` buys `m` inner steps on the surrogate "
        "`⟨∂L/∂z, f(θ) − z⟩ + ‖f(θ) − z‖²/(2η)`, which need only the model `f` and its VJP "
        "(`targets_fn`, `target_grad`). Full-batch logistic regression (n = 1000, d = 20); the loss against the "
        "number of expensive gradients, against gradient descent with step 1/L."
    ),
    new_code_cell(
        "from jaxopt_lab.transforms.sso import scale_by_sso\n\n"
        "lr_data = logistic_regression(num_examples=1000, dim=20, seed=0)\n"
        "X = jnp.asarray(lr_data.x_train, jnp.float32); Y = jnp.asarray(lr_data.y_train, jnp.float32)\n"
        "n, d = X.shape\n"
        "loss_z = lambda z: jnp.mean(jnp.logaddexp(0.0, z) - Y * z)\n"
        "loss_w = jax.jit(lambda w: loss_z(X @ w))\n"
        "grad_z = jax.jit(jax.grad(loss_z))\n"
        "w = np.zeros(d)  # reference optimum: Newton in float64\n"
        "X64, Y64 = np.asarray(X, np.float64), np.asarray(Y, np.float64)\n"
        "for _ in range(30):\n"
        "    p = 1 / (1 + np.exp(-X64 @ w))\n"
        "    w -= np.linalg.solve(X64.T @ (X64 * (p * (1 - p))[:, None]) / n, X64.T @ (p - Y64) / n)\n"
        "f_star = float(np.mean(np.logaddexp(0, X64 @ w) - Y64 * (X64 @ w)))\n"
        "GRADS = max(10, STEPS // 3)\n\n"
        "def run_sso(m, eta):\n"
        "    tx = scale_by_sso(eta=eta, m=m)\n"
        "    params = {'w': jnp.zeros(d)}; state = tx.init(params)\n"
        "    step = jax.jit(lambda p, s, gz: tx.update(p, s, p, targets_fn=lambda q: X @ q['w'], target_grad=gz))\n"
        "    gaps = []\n"
        "    for _ in range(GRADS):\n"
        "        u, state = step(params, state, grad_z(X @ params['w']))\n"
        "        params = {'w': params['w'] - u['w']}\n"
        "        gaps.append(float(loss_w(params['w'])) - f_star)\n"
        "    return gaps\n\n"
        "def run_gd():\n"
        "    lip = np.linalg.eigvalsh(X64.T @ X64)[-1] / (4 * n)  # the loss's smoothness constant\n"
        "    g_fn, wv, gaps = jax.jit(jax.grad(loss_w)), jnp.zeros(d), []\n"
        "    for _ in range(GRADS):\n"
        "        wv = wv - g_fn(wv) / lip\n"
        "        gaps.append(float(loss_w(wv)) - f_star)\n"
        "    return gaps\n\n"
        "sso_runs = {'GD, step 1/L': run_gd()}\n"
        "for m in (5, 20):\n"
        "    sso_runs[f'SSO m={m}, η=0.125/n'] = run_sso(m, 0.125 / n)\n"
        "first = lambda gaps, tol: next((i + 1 for i, g in enumerate(gaps) if g <= tol), f'>{GRADS}')\n"
        "show_table([{'method': k, f'L − L* after {GRADS} gradients': f'{v[-1]:.2e}',\n"
        "             'gradients to L* + 1e-3': first(v, 1e-3), 'gradients to L* + 1e-4': first(v, 1e-4)}\n"
        "            for k, v in sso_runs.items()])"
    ),
    new_code_cell(
        "plt.figure(figsize=(6, 3.5))\n"
        "for k, v in sso_runs.items():\n"
        "    plt.semilogy(range(1, len(v) + 1), np.maximum(v, 1e-8), label=k)\n"
        "plt.xlabel('expensive gradients'); plt.ylabel('L − L*'); plt.legend(); plt.grid(alpha=0.3); plt.show()"
    ),
    # --- tpSGD
    new_markdown_cell(
        "## 3. tpSGD: hidden layers without a backward pass\n\n"
        "tpSGD (target projection SGD): each hidden layer gets a local gradient from a fixed random projection "
        "of the one-hot label (`layer_inputs`, `layer_preacts`, `labels` passed to `update`), the output layer "
        "the cross-entropy's gradient with its input held fixed. One forward pass, no backward pass through "
        "the network. An MLP 64-256-256-10 on digits, against backprop SGD."
    ),
    new_code_cell(
        "from jaxopt_lab.transforms.tpsgd import tpsgd\n\n"
        "SIZES = (64, 256, 256, 10)\n"
        "def init_mlp(sizes, seed):\n"
        "    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)\n"
        "    return {'layers': [{'kernel': jax.random.normal(k, (a, b)) / np.sqrt(a), 'bias': jnp.zeros(b)}\n"
        "                       for k, a, b in zip(keys, sizes[:-1], sizes[1:])]}\n\n"
        "def forward(p, x, keep=False):\n"
        "    h, inputs, preacts = x.reshape(x.shape[0], -1), [], []\n"
        "    for layer in p['layers'][:-1]:\n"
        "        a = h @ layer['kernel'] + layer['bias']\n"
        "        inputs.append(h); preacts.append(a)\n"
        "        h = jax.nn.relu(a)\n"
        "    out = h @ p['layers'][-1]['kernel'] + p['layers'][-1]['bias']\n"
        "    return (out, h, inputs, preacts) if keep else out\n\n"
        "ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()\n\n"
        "def train_tp(lr, backprop, epochs=EPOCHS, batch=32, seed=0):\n"
        "    hidden = [f'layers/{i}' for i in range(len(SIZES) - 2)]\n"
        "    tx = optax.sgd(lr, momentum=0.9) if backprop else tpsgd(lr, hidden, num_classes=10, momentum=0.9)\n"
        "    p = init_mlp(SIZES, seed); s = tx.init(p)\n\n"
        "    @jax.jit\n"
        "    def step(p, s, x, y):\n"
        "        if backprop:\n"
        "            u, s = tx.update(jax.grad(lambda q: ce(forward(q, x), y))(p), s, p)\n"
        "        else:\n"
        "            _, h, inputs, preacts = forward(jax.lax.stop_gradient(p), x, keep=True)\n"
        "            g_out = jax.grad(lambda q: ce(h @ q['kernel'] + q['bias'], y))(p['layers'][-1])\n"
        "            g = {'layers': list(p['layers'][:-1]) + [g_out]}  # hidden entries: placeholders the transform replaces\n"
        "            u, s = tx.update(g, s, p, layer_inputs=inputs, layer_preacts=preacts, labels=y)\n"
        "        return optax.apply_updates(p, u), s\n\n"
        "    acc = jax.jit(lambda p: jnp.mean(jnp.argmax(forward(p, x_test), -1) == y_test))\n"
        "    n, accs = x_train.shape[0] // batch * batch, []\n"
        "    for epoch in range(epochs):\n"
        "        for idx in np.random.default_rng([seed, epoch]).permutation(x_train.shape[0])[:n].reshape(-1, batch):\n"
        "            p, s = step(p, s, x_train[idx], y_train[idx])\n"
        "        accs.append(float(acc(p)))\n"
        "    return accs\n\n"
        "tp_runs = {'backprop SGD, lr 0.05': train_tp(0.05, True), 'tpSGD, lr 0.01': train_tp(0.01, False),\n"
        "           'tpSGD, lr 0.002': train_tp(0.002, False)}\n"
        "show_table([{'method': k, 'test accuracy, epoch 1': f'{v[0]:.3f}', f'epoch {EPOCHS}': f'{v[-1]:.3f}'}\n"
        "            for k, v in tp_runs.items()])"
    ),
    new_code_cell(
        "plt.figure(figsize=(6, 3.5))\n"
        "for k, v in tp_runs.items():\n"
        "    plt.plot(range(1, len(v) + 1), v, 'o-', label=k)\n"
        "plt.xlabel('epoch'); plt.ylabel('test accuracy'); plt.legend(); plt.grid(alpha=0.3); plt.show()"
    ),
    # --- GNS
    new_markdown_cell(
        "## 4. Gradient-normalized smoothness: regularized Newton with an adaptive search\n\n"
        "`scale_by_gradient_normalized_smoothness` takes the step `−(H + √(γ‖g‖) I)⁻¹ g` and adapts `γ` by a "
        "search on the loss (`loss_fn` passed to `update`; `hessian='dense'` here, low-rank and CG variants "
        "for large models). The 10-D extended Rosenbrock function from (−1.2, 1, …), against pure Newton and "
        "gradient descent with Armijo backtracking."
    ),
    new_code_cell(
        "from jax.flatten_util import ravel_pytree\n"
        "from jaxopt_lab.transforms.gradient_normalized_smoothness import scale_by_gradient_normalized_smoothness\n\n"
        "def rosenbrock(p):\n"
        "    v = p['w']\n"
        "    return jnp.sum(100.0 * (v[1:] - v[:-1] ** 2) ** 2 + (1.0 - v[:-1]) ** 2)\n"
        "p0 = {'w': jnp.asarray(np.where(np.arange(10) % 2 == 0, -1.2, 1.0), jnp.float32)}\n"
        "NEWTON_STEPS = max(20, STEPS // 3)\n\n"
        "def run_gns(steps=NEWTON_STEPS):\n"
        "    tx = scale_by_gradient_normalized_smoothness()\n"
        "    step = jax.jit(lambda p, s: tx.update(jax.grad(rosenbrock)(p), s, p, loss_fn=rosenbrock))\n"
        "    p, s, losses, evals = p0, tx.init(p0), [], []\n"
        "    for _ in range(steps):\n"
        "        u, s = step(p, s)\n"
        "        p = jax.tree.map(lambda a, b: a - b, p, u)\n"
        "        losses.append(float(rosenbrock(p))); evals.append(len(losses) + int(s.trials))\n"
        "    return losses, evals\n\n"
        "def run_newton(steps=NEWTON_STEPS):\n"
        "    f = lambda v: rosenbrock({'w': v})\n"
        "    step = jax.jit(lambda v: v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v)))\n"
        "    v, losses = p0['w'], []\n"
        "    for _ in range(steps):\n"
        "        v = step(v); losses.append(float(f(v)))\n"
        "    return losses, list(range(1, steps + 1))\n\n"
        "def run_gd(steps=NEWTON_STEPS):\n"
        "    f = jax.jit(lambda v: rosenbrock({'w': v})); g = jax.jit(jax.grad(lambda v: rosenbrock({'w': v})))\n"
        "    v, losses, evals, k = p0['w'], [], [], 0\n"
        "    for _ in range(steps):\n"
        "        gv, fv, a = g(v), f(v), 1.0\n"
        "        k += 1\n"
        "        while f(v - a * gv) > fv - 1e-4 * a * float(gv @ gv) and a > 1e-10:\n"
        "            a *= 0.5\n"
        "        v = v - a * gv; losses.append(float(f(v))); evals.append(k)\n"
        "    return losses, evals\n\n"
        "gns_runs = {'gradient-normalized smoothness': run_gns(), 'Newton': run_newton(), 'GD + Armijo': run_gd()}\n"
        "show_table([{'method': k, 'steps': len(l), 'gradient evaluations': e[-1], 'final loss': f'{l[-1]:.2e}',\n"
        "             'min loss': f'{min(l):.2e}'} for k, (l, e) in gns_runs.items()])"
    ),
    new_code_cell(
        "plt.figure(figsize=(6, 3.5))\n"
        "for k, (l, e) in gns_runs.items():\n"
        "    plt.semilogy(range(1, len(l) + 1), np.maximum(np.nan_to_num(l, nan=1e6), 1e-12), label=k)\n"
        "plt.xlabel('step'); plt.ylabel('Rosenbrock loss'); plt.legend(); plt.grid(alpha=0.3); plt.show()"
    ),
    # --- ghost batch norm
    new_markdown_cell(
        "## 5. Large batches: ghost batch norm, learning-rate scaling, regime adaptation\n\n"
        "Hoffer et al. (2017): at the same learning rate and epochs, a large batch generalizes worse; the gap "
        "closes with the learning rate scaled by √(B/b) (`sqrt_scaled_learning_rate`), batch norm over *ghost* "
        "batches of the small size (`GhostBatchNorm`), and as many updates as the small batch made "
        "(`regime_adaptation` / `steps_for_batch`). A CNN with (ghost) batch norm on digits, SGD with momentum."
    ),
    new_code_cell(
        "from jaxopt_lab.schedules import sqrt_scaled_learning_rate, steps_for_batch\n\n"
        "class BNCNN(nnx.Module):\n"
        "    def __init__(self, ghost_size, channels=(16, 32), *, rngs):\n"
        "        sizes = (1, *channels)\n"
        "        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding='SAME', use_bias=False, rngs=rngs)\n"
        "                               for a, b in zip(sizes[:-1], sizes[1:])])\n"
        "        self.norms = nnx.List([GhostBatchNorm(b, ghost_size) for b in channels])\n"
        "        self.head = nnx.Linear(channels[-1], 10, rngs=rngs)\n\n"
        "    def __call__(self, x):\n"
        "        for conv, norm in zip(self.convs, self.norms):\n"
        "            x = nnx.avg_pool(jax.nn.relu(norm(conv(x))), (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)\n"
        "        return self.head(jnp.mean(x, axis=(1, 2)))\n\n"
        "def train_bn(batch, ghost, lr, steps, seed=0):\n"
        "    model = BNCNN(ghost, rngs=nnx.Rngs(seed))\n"
        "    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)\n"
        "    model.eval(); eval_graphdef = nnx.graphdef(model)\n"
        "    tx = optax.sgd(lr, momentum=0.9)\n\n"
        "    def loss_fn(p, s, x, y):\n"
        "        m = nnx.merge(graphdef, p, s, copy=True)\n"
        "        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean(), nnx.state(m, nnx.BatchStat)\n\n"
        "    @jax.jit\n"
        "    def run(carry, idxs):\n"
        "        def step(carry, idx):\n"
        "            p, s, o = carry\n"
        "            (_, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x_train[idx], y_train[idx])\n"
        "            u, o = tx.update(g, o, p)\n"
        "            return (optax.apply_updates(p, u), s, o), None\n"
        "        return jax.lax.scan(step, carry, idxs)[0]\n\n"
        "    idxs = jnp.asarray(np.stack([digits.batch_indices(t, batch, seed) for t in range(steps)]))\n"
        "    p, s, _ = run((params, stats, tx.init(params)), idxs)\n"
        "    logits = nnx.merge(eval_graphdef, p, s, copy=True)(x_test)\n"
        "    return float(jnp.mean(logits.argmax(-1) == y_test))\n\n"
        "SMALL, LARGE, LR = 32, 512, 0.05\n"
        "sb_steps = math.ceil(EPOCHS * digits.num_train / SMALL)\n"
        "lb_steps = steps_for_batch(sb_steps, SMALL, LARGE, adapt_regime=False)  # the same epochs\n"
        "ra_steps = steps_for_batch(sb_steps, SMALL, LARGE)  # regime adaptation: the same number of updates\n"
        "lr_sqrt = float(sqrt_scaled_learning_rate(LR, SMALL, LARGE))\n"
        "settings = {\n"
        "    f'small batch {SMALL}': (SMALL, SMALL, LR, sb_steps),\n"
        "    f'large batch {LARGE}': (LARGE, LARGE, LR, lb_steps),\n"
        "    '+ √ lr scaling': (LARGE, LARGE, lr_sqrt, lb_steps),\n"
        "    f'+ ghost batch norm ({SMALL})': (LARGE, SMALL, lr_sqrt, lb_steps),\n"
        "    '+ regime adaptation': (LARGE, SMALL, lr_sqrt, ra_steps),\n"
        "}\n"
        "gbn_rows = [{'setting': k, 'batch': b, 'ghost batch': g, 'lr': f'{lr:.3g}', 'steps': t,\n"
        "             'test accuracy': f'{train_bn(b, g, lr, t):.3f}'} for k, (b, g, lr, t) in settings.items()]\n"
        "show_table(gbn_rows)"
    ),
    new_code_cell(
        "from jaxopt_lab.schedules import predicted_max_learning_rate\n"
        "fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))\n"
        "a1.barh([r['setting'] for r in gbn_rows][::-1], [float(r['test accuracy']) for r in gbn_rows][::-1])\n"
        "a1.set_xlabel('test accuracy'); a1.set_xlim(0, 1); a1.grid(alpha=0.3)\n"
        "batches = [8, 16, 32, 64, 128, 256, 512, 1024]\n"
        "for rule in ('linear', 'sqrt'):  # Granziol et al.: SGD's max stable lr grows ∝ B, Adam's ∝ √B\n"
        "    a2.loglog(batches, predicted_max_learning_rate(batches, 32, 0.1, rule), 'o-', label=f'{rule} rule')\n"
        "a2.set_xlabel('batch size'); a2.set_ylabel('predicted max stable lr (0.1 at 32)'); a2.legend(); a2.grid(alpha=0.3)\n"
        "plt.tight_layout(); plt.show()"
    ),
    # --- instability proxies
    new_markdown_cell(
        "## 6. Instability proxies: attention-logit growth and output log Z\n\n"
        "Wortsman et al. (2024) reproduce large-scale Transformer instabilities at small scale by raising the "
        "learning rate: the attention logits grow until the softmax saturates, and the output logits drift "
        "(log Z far from 0). qk-layernorm (`GPT(qk_layernorm=True)`) and z-loss (`jaxopt_lab.losses.z_loss`) "
        "mitigate both; `lr_sensitivity` summarizes a learning-rate sweep in one number (lower: less sensitive). "
        "A 2-layer, width-32 byte-level GPT, all learning rates of one variant trained together under `vmap`."
    ),
    new_code_cell(
        "from jaxopt_lab.diagnostics import instability_metrics\n"
        "from jaxopt_lab.diagnostics.instability import lr_sensitivity\n"
        "from jaxopt_lab.losses import z_loss\n\n"
        "WIDTH, CONTEXT, GPT_BATCH = 32, 32, 16\n"
        "LRS = [1e-3, 1e-2, 1e-1, 1.0]\n"
        "text = load_text(context=CONTEXT)\n"
        "xs, ys = map(jnp.asarray, map(np.stack, zip(*(text.batch(t, GPT_BATCH, 0) for t in range(STEPS)))))\n"
        "x_val, y_val = map(jnp.asarray, next(text.eval_batches(64, max_batches=1)))\n\n"
        "def sweep(qk_layernorm, z_weight):\n"
        "    graphdef, params = nnx.split(GPT(vocab_size=256, layers=2, width=WIDTH, heads=2, context=CONTEXT,\n"
        "                                     qk_layernorm=qk_layernorm, rngs=nnx.Rngs(0)))\n"
        "    ce = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()\n\n"
        "    def train_loss(p, x, y):\n"
        "        logits = nnx.merge(graphdef, p)(x)\n"
        "        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()\n"
        "        return loss + (z_loss(logits, z_weight) if z_weight else 0.0)\n\n"
        "    @jax.jit\n"
        "    def one(lr):\n"
        "        unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, STEPS // 10), STEPS, 0.0)\n"
        "        tx = optax.adamw(lambda t: lr * unit(t), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)\n"
        "        def step(carry, batch):\n"
        "            p, o = carry\n"
        "            u, o = tx.update(jax.grad(train_loss)(p, *batch), o, p)\n"
        "            return (optax.apply_updates(p, u), o), None\n"
        "        (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))\n"
        "        return ce(p, x_val, y_val), instability_metrics(nnx.merge(graphdef, p), xs[-1])\n\n"
        "    final, monitors = jax.vmap(one)(jnp.asarray(LRS, jnp.float32))\n"
        "    return float(ce(params, x_val, y_val)), np.asarray(final), {k: np.asarray(v) for k, v in monitors.items()}\n\n"
        "inst = {'baseline': sweep(False, 0.0), 'qk-layernorm + z-loss 1e-4': sweep(True, 1e-4)}\n"
        "rows = []\n"
        "for name, (loss0, final, mon) in inst.items():\n"
        "    for i, lr in enumerate(LRS):\n"
        "        rows.append({'variant': name, 'lr': f'{lr:g}', 'final val loss': f'{final[i]:.3f}',\n"
        "                     'max attention logit': f'{mon[\"attn_logit_max\"][i]:.1f}',\n"
        "                     'mean log Z': f'{mon[\"log_z_mean\"][i]:.2f}', 'max abs log Z': f'{mon[\"log_z_abs_max\"][i]:.2f}'})\n"
        "show_table(rows)\n"
        "show_table([{'variant': k, 'LR sensitivity': f'{lr_sensitivity(v[1], v[0]):.3f}'} for k, v in inst.items()])"
    ),
    new_code_cell(
        "fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))\n"
        "for name, (loss0, final, mon) in inst.items():\n"
        "    axes[0].semilogx(LRS, np.minimum(np.nan_to_num(final, nan=loss0), loss0), 'o-', label=name)\n"
        "    axes[1].loglog(LRS, mon['attn_logit_max'], 'o-', label=name)\n"
        "    axes[2].semilogx(LRS, mon['log_z_abs_max'], 'o-', label=name)\n"
        "for a, t in zip(axes, ['final validation loss', 'max attention logit', 'max |log Z|']):\n"
        "    a.set_xlabel('learning rate'); a.set_title(t); a.grid(alpha=0.3)\n"
        "axes[0].legend(fontsize=8); plt.tight_layout(); plt.show()"
    ),
    # --- opposing signals
    new_markdown_cell(
        "## 7. Opposing signals at the edge of stability\n\n"
        "Rosenfeld & Risteski (2024): a few groups of training examples pull a shared feature in opposite "
        "directions; their losses oscillate against each other while the sharpness hovers at 2/lr. "
        "`opposing_signals` finds the two groups from the per-example gradients (the extremes along their top "
        "principal direction); `edge_of_stability` measures the sharpness by Lanczos. Full-batch gradient "
        "descent on digits with an MLP."
    ),
    new_code_cell(
        "from jaxopt_lab.diagnostics import edge_of_stability, group_losses, opposing_signals\n\n"
        "LR_GD, K = 0.5, 20\n"
        "IDENTIFY = STEPS // 3\n"
        "x_flat = x_train.reshape(x_train.shape[0], -1)\n"
        "graphdef, params = nnx.split(MLP(64, (64, 64), 10, rngs=nnx.Rngs(0)))\n"
        "example_losses = lambda p: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x_flat), y_train)\n"
        "one_loss = lambda p, xi, yi: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(xi[None]), yi[None])[0]\n\n"
        "@jax.jit\n"
        "def gd_step(p):\n"
        "    losses, vjp = jax.vjp(example_losses, p)\n"
        "    (g,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))\n"
        "    return jax.tree.map(lambda a, b: a - LR_GD * b, p, g), losses\n\n"
        "sharp = jax.jit(lambda p, key: edge_of_stability(lambda q: example_losses(q).mean(), p, LR_GD, key)['sharpness'])\n"
        "history, sharpness = [], []\n"
        "for step in range(STEPS):\n"
        "    if step % 20 == 0:\n"
        "        sharpness.append((step, float(sharp(params, jax.random.key(step)))))\n"
        "    if step == IDENTIFY:\n"
        "        found = opposing_signals(one_loss, params, x_flat, y_train, k=K)\n"
        "    params, losses = gd_step(params)\n"
        "    history.append(np.asarray(losses))\n"
        "losses = np.stack(history)\n"
        "groups = np.asarray(group_losses(jnp.asarray(losses), [found.positive, found.negative]))\n"
        "after = np.diff(groups[IDENTIFY:], axis=0)\n"
        "show_table([{'k per group': K, 'identified at step': IDENTIFY,\n"
        "             'corr(Δ loss +, Δ loss −) after': f'{np.corrcoef(after[:, 0], after[:, 1])[0, 1]:.3f}',\n"
        "             'final train loss': f'{losses[-1].mean():.3f}', 'max sharpness': f'{max(s for _, s in sharpness):.2f}',\n"
        "             '2/lr': f'{2 / LR_GD:.2f}'}])"
    ),
    new_code_cell(
        "fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))\n"
        "a1.plot(losses.mean(1), 'k', label='all examples')\n"
        "a1.plot(groups[:, 0], label='group +'); a1.plot(groups[:, 1], label='group −')\n"
        "a1.axvline(IDENTIFY, color='gray', ls=':'); a1.set_yscale('log'); a1.set_xlabel('step'); a1.set_ylabel('loss')\n"
        "a1.legend(); a1.grid(alpha=0.3)\n"
        "a2.plot(*zip(*sharpness), 'o-', label='sharpness'); a2.axhline(2 / LR_GD, color='r', ls='--', label='2/lr')\n"
        "a2.set_xlabel('step'); a2.legend(); a2.grid(alpha=0.3)\n"
        "plt.tight_layout(); plt.show()"
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
    "08_finetuning.ipynb": lambda: FINETUNING,
    "09_dynamics.ipynb": lambda: DYNAMICS,
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
