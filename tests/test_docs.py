"""The documentation builds without broken references, and documents every option."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trl_visual import DiffusionGRPOConfig
from trl_visual.cli import ModelArguments, ScriptArguments

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are not installed (pip install -e '.[docs]'); the `test` extra installs them",
)
def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` fails on any warning: broken links or anchors, pages missing from the nav,
    API-reference objects that do not exist."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "api" / "index.html").read_text().count("compute_advantages") > 0


def _own_fields(config_class: type) -> list[str]:
    base = {f.name for f in dataclasses.fields(config_class.__mro__[1])}
    own = [f.name for f in dataclasses.fields(config_class) if f.name not in base]
    changed = [
        name for name in config_class.__dataclass_fields__ if name in vars(config_class) and name in base
    ]
    return own + changed


def test_grpo_page_lists_every_config_field():
    page = (DOCS / "grpo.md").read_text()
    missing = [name for name in _own_fields(DiffusionGRPOConfig) if not re.search(rf"`{name}`", page)]
    assert not missing, f"docs/grpo.md does not document: {missing}"


def test_cli_page_lists_every_flag():
    page = (DOCS / "cli.md").read_text()
    flags = [f.name for cls in (ScriptArguments, ModelArguments) for f in dataclasses.fields(cls)]
    missing = [name for name in flags if f"--{name}" not in page]
    assert not missing, f"docs/cli.md does not document: {missing}"
