"""experiments/diloco_gpt_small.toml: built from shapes at full size, run for 2 steps shrunk.

The config is meant for a GPU or a pod, reading OpenWebText's GPT-2 tokens from
``data/openwebtext``; here a tiny token folder of the same format stands in for it. It is
built with ``jax.eval_shape`` (nothing allocated) and its memory estimate checked against
one H200; then its model is shrunk by
overrides and trained 2 steps through the trainer, on 4 workers of 2 CPU devices each (the
(workers x model) mesh, FSDP inside each worker), checkpointed and resumed.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.build import build, check_memory

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "diloco_gpt_small.toml")
H200_BYTES = 141 * 10**9


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A tiny data/openwebtext: GPT-2-sized ids, uint16, train.bin and val.bin (no meta.json, as nanoGPT's)."""
    folder = tmp_path_factory.mktemp("openwebtext")
    rng = np.random.default_rng(0)
    rng.integers(0, 256, 4096, dtype=np.uint16).tofile(folder / "train.bin")  # ids < 256: the shrunk model's vocabulary
    rng.integers(0, 256, 2048, dtype=np.uint16).tofile(folder / "val.bin")
    return str(folder)


def test_full_size_builds_from_shapes(tokens):
    cfg = config_lib.load(PATH)
    assert cfg.data["name"] == "tokens" and cfg.data["path"] == "data/openwebtext"
    exp = build(config_lib.load(PATH, [f"data.path={tokens}"]), abstract=True, check_fit=False)
    params = nnx.state(exp.model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == 124_439_808  # GPT-2 small
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))  # nothing allocated
    state = jax.eval_shape(exp.tx.init, params)
    assert exp.config.method["sync_every"] == 500 and exp.runner.num_workers == 8
    # AdamW's two moments + DiLoCo's anchor and outer momentum: 4 copies of the parameters
    float_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.dtype == np.float32)
    assert float_bytes == 4 * 4 * 124_439_808
    assert 30e9 < check_memory(exp, limit=H200_BYTES) < H200_BYTES  # 8 workers fit one H200


def test_shrunk_runs_two_steps_with_workers_spanning_devices(tmp_path, tokens):
    tiny = ["model.layers=1", "model.width=32", "model.heads=2", "model.context=16", f"data.path={tokens}",
            "data.seq_len=16", "data.vocab_size=256", "train.steps=2", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
            "method.sync_every=1", "workers.count=4", "workers.devices_per_worker=2", "checkpoint.every=1",
            "logging.progress=false", "logging.tensorboard=false", f"run.out_dir={tmp_path}"]
    result = trainer.run(PATH, tiny)
    assert result.final["step"] == 2 and np.isfinite(result.final["loss"]) and np.isfinite(result.final["eval_loss"])
    assert result.final["bytes_communicated"] > 0  # both steps synchronize (one compiled program)
    # the sharded state checkpoints and resumes: step 2 again from checkpoint 1 gives the same numbers
    shutil.rmtree(os.path.join(result.run_dir, "checkpoints", "2"))
    resumed = trainer.resume(result.run_dir)
    assert {k: resumed.final[k] for k in ("loss", "eval_loss")} == {k: result.final[k] for k in ("loss", "eval_loss")}
