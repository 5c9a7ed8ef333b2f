"""`jaxopt-lab run` on a config with variants runs each, prints a table, writes a plot."""

import os

from jaxopt_lab.experiment.cli import main
from jaxopt_lab.experiment.metrics import read_metrics


def test_variants_run_side_by_side(tmp_path, capsys):
    path = tmp_path / "cmp.toml"
    path.write_text(
        f'[run]\nname = "cmp"\nout_dir = "{tmp_path / "runs"}"\n[data]\nname = "digits"\n'
        '[model]\nname = "mlp"\nhidden = [8]\n[method]\nname = "sgd"\nlearning_rate = 0.3\n'
        '[train]\nsteps = 4\nbatch_size = 8\neval_every = 2\n[logging]\nprogress = false\ntensorboard = false\n'
        '[variants.ddp]\nworkers = { count = 2 }\nmethod = { name = "data_parallel", inner = { name = "sgd", learning_rate = 0.3 } }\n'
        '[variants.diloco]\nworkers = { count = 2 }\n'
        'method = { name = "diloco", sync_every = 2, inner = { name = "sgd", learning_rate = 0.3 }, outer = { name = "sgd", learning_rate = 1.0 } }\n'
    )
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ddp") or line.startswith("| diloco")]
    assert len(rows) == 2
    base = tmp_path / "runs" / "cmp"
    assert (base / "compare.png").read_bytes()[:4] == b"\x89PNG"
    ddp, dil = (read_metrics(str(base / v))[-1]["bytes_communicated"] for v in ("ddp", "diloco"))
    assert ddp == 2 * dil > 0  # H = 2: half the bytes
    assert f"{ddp:.3e}" in rows[0] and os.path.exists(base / "compare.md")
    # W = 2: a ring all-reduce puts 2 (W-1) / W = 1x the payload on the wire; both columns are printed
    ddp_wire = read_metrics(str(base / "ddp"))[-1]["wire_bytes"]
    assert ddp_wire == ddp and "payload bytes/worker | wire bytes/worker" in out
