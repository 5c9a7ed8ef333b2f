"""The documentation builds with warnings as errors (Sphinx + autodoc + myst-nb, notebooks shown
with their committed outputs, not executed): a docstring that breaks the RST fails here."""

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_docs_build_without_warnings(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), os.path.join(ROOT, "docs", "source"), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    html = tmp_path / "html"
    for page in ("index", "workers", "api/transforms", "api/distributed", "api/lowrank", "api/finetune",
                 "tutorials/00_quickstart"):
        assert (html / f"{page}.html").is_file(), page
    # autodoc found the methods and their equations
    distributed = (html / "api" / "distributed.html").read_text()
    assert "jaxopt_lab.distributed.diloco" in distributed and 'class="math' in distributed
    # every public name of jaxopt_lab.finetune has its entry (the page autodocs the package's __all__)
    import jaxopt_lab.finetune

    finetune = (html / "api" / "finetune.html").read_text()
    missing = [n for n in jaxopt_lab.finetune.__all__  # (a constant is documented in its module's section)
               if not re.search(rf'id="jaxopt_lab\.finetune\.(\w+\.)?{n}"', finetune)]
    assert not missing, missing
    assert "std_j = (σ" in finetune  # lora_ggpo's rule, from its docstring
