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


def test_checkpoint_never_imports_the_assembling_layers() -> None:
    """ldm/checkpoint/ is formats and key maps: building models lives above it (ldm.assemble,
    ldm.build, ldm.pretrained), so not even a function-level import reaches up."""
    import ast
    from pathlib import Path

    above = {"ldm.build", "ldm.assemble", "ldm.pretrained", "ldm.export", "ldm.build_sdxl"}
    bad = []
    for path in sorted((Path(__file__).parents[1] / "ldm" / "checkpoint").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            if names & above:
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"ldm/checkpoint imports an assembling layer at {bad}"
