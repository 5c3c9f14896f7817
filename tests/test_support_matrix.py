"""docs/support.md cannot rot: every test or benchmark it cites exists, every cell is a citation or "not yet", no
GPU level is claimed without a recorded run, and every path it should cover has its row."""

import re
from pathlib import Path

import pytest

from trl_visual.rewards import REWARD_REGISTRY

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "support.md"
LEVELS = [
    "math checked",
    "tiny pipeline trains",
    "miniature world learns",
    "real architecture on a GPU",
    "real checkpoint smoke",
    "end-to-end training",
]
GPU_LEVELS = LEVELS[3:]
TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([\w.-]+)\])?`")
BENCHMARK = re.compile(r"`(benchmarks/[\w/]+\.py)`")
RECORD = re.compile(r"`(docs/records/[\w./-]+)`")


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each Markdown table of the page under its first header cell: a list of rows, ``{column: cell}``."""
    found: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*-+\s*\|)+", lines[i + 1]):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                cells = [cell.strip() for cell in row.strip("|").split("|")]
                assert len(cells) == len(header), (
                    f"a row of the {header[0]!r} table has {len(cells)} cells: {row}"
                )
                rows.append(dict(zip(header, cells)))
            found[header[0]] = rows
    return found


def citations(cell: str) -> list[str]:
    return TEST.findall(cell) + BENCHMARK.findall(cell) + RECORD.findall(cell)


@pytest.fixture(scope="module")
def matrix():
    found = tables(PAGE.read_text())
    assert set(found) == {"family × method", "engine", "reward"}
    for name, rows in found.items():
        assert list(rows[0]) == [name, *LEVELS], f"the {name!r} table's columns"
    return found


def cells(matrix, levels=LEVELS):
    """``(row label / level, cell)`` for every cell of the levels' columns."""
    for name, rows in matrix.items():
        for row in rows:
            for level in levels:
                yield f"{row[name]} / {level}", row[level]


def test_every_cited_test_and_benchmark_exists(matrix):
    missing = []
    for _, cell in cells(matrix):
        for path, name, parameter in TEST.findall(cell):
            source = ROOT / path
            text = source.read_text() if source.is_file() else ""
            if not re.search(rf"^def {name}\(", text, re.MULTILINE):
                missing.append(f"{path}::{name}")
            elif parameter and not re.search(rf"[\"']{re.escape(parameter)}[\"']", text):
                missing.append(f"{path}::{name}[{parameter}] (no such parameter)")
        missing += [
            path for path in BENCHMARK.findall(cell) + RECORD.findall(cell) if not (ROOT / path).is_file()
        ]
    assert not missing, f"docs/support.md cites what does not exist: {missing}"


def test_every_cell_is_a_citation_or_not_yet(matrix):
    bare = [
        f"{where}: {cell!r}" for where, cell in cells(matrix) if cell != "not yet" and not citations(cell)
    ]
    assert not bare, f"cells that neither cite a test or benchmark nor say 'not yet': {bare}"


def test_no_gpu_level_without_a_recorded_run(matrix):
    claimed = [
        where for where, cell in cells(matrix, GPU_LEVELS) if cell != "not yet" and not RECORD.findall(cell)
    ]
    assert not claimed, f"GPU levels claimed without a record under docs/records/: {claimed}"


def test_every_family_method_engine_and_learned_reward_has_a_row(matrix):
    families = ["SD3 / SD3.5", "FLUX.1", "Wan2.1 / 2.2 T2V", "Wan I2V"]
    methods = ["GRPO", "BPGO", "ViPO", "BPGO×ViPO"]
    assert [row["family × method"] for row in matrix["family × method"]] == [
        f"{family} × {method}" for family in families for method in methods
    ]
    engines = [row["engine"].split(" (")[0] for row in matrix["engine"]]
    assert engines == ["single process", "DDP", "FSDP", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3"]
    rows = {row["reward"].strip("`") for row in matrix["reward"]}
    own = {"red_channel", "jpeg_compressibility", "jpeg_incompressibility"}  # functions, nothing learned
    learned = {
        name for name in REWARD_REGISTRY if name not in own and not name.startswith(("shapes_", "scenes_"))
    }
    assert rows == learned, (
        f"learned rewards without a row: {learned - rows}; rows of no reward: {rows - learned}"
    )


def test_the_matrix_is_linked_from_the_readme_and_the_docs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What is validated") :]
    assert "(docs/support.md)" in section.split("\n## ")[0]
    assert "support.md" in (ROOT / "mkdocs.yml").read_text()
    assert "(support.md)" in (ROOT / "docs" / "index.md").read_text()
