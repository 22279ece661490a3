"""DESIGN.md's import rules: models/diffusion/nn never pull in Lightning; sample.py neither."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import {modules}
bad = [m for m in ("pytorch_lightning", "lightning") if m in sys.modules]
assert not bad, bad
"""


def run(modules: str) -> None:
    subprocess.run([sys.executable, "-c", CHECK.format(modules=modules)], check=True)


def test_models_and_diffusion_do_not_import_lightning() -> None:
    run("ldm.models, ldm.nn, ldm.diffusion, ldm.checkpoint, ldm.config, ldm.images")
