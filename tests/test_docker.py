"""The Docker image installs extras that setup.cfg defines (a typo there only fails at build)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_extras(text: str) -> list[str]:
    """Extras named in ``pip install ... .[a,b]`` / ``-e ".[a]"`` lines of a Dockerfile."""
    extras: list[str] = []
    for match in re.finditer(r"pip install[^\n]*?\.\[([^\]]*)\]", text.replace("\\\n", " ")):
        extras += [e.strip() for e in match.group(1).split(",") if e.strip()]
    return extras


def test_dockerfile_extras_exist_in_setup_cfg() -> None:
    extras = dockerfile_extras((ROOT / "docker" / "Dockerfile").read_text())
    assert extras, "the Dockerfile installs the package with no extras"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    defined = set(setup["options.extras_require"])
    missing = [e for e in extras if e not in defined]
    assert not missing, f"Dockerfile installs extras {missing} that setup.cfg does not define"


def test_extras_parser() -> None:
    text = 'RUN pip install --no-cache-dir \\\n    -e ".[openclip, dev]"\nRUN pip install "x.[y]"'
    assert dockerfile_extras(text) == ["openclip", "dev", "y"]
