"""The package's import graph runs one way, down the floors of ``docs/architecture.md``, and has no circle.

Every module of ``trl_visual`` is read with :mod:`ast` (nothing is imported) and every ``import`` statement
counts, wherever it sits: at the top, inside a function (a lazy import), or under ``if TYPE_CHECKING:``. An
edge ``a → b`` is allowed when ``b``'s floor is ``a``'s or lower; modules on one floor may import each other as
long as no circle forms. The floors are written here, so that moving a module up or down is a visible change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trl_visual
from trl_visual.trainer.bpgo_trainer import BPGOTrainer
from trl_visual.trainer.bpgo_vipo import BPGOViPOTrainer
from trl_visual.trainer.diffusion_grpo_trainer import DiffusionGRPOTrainer
from trl_visual.trainer.vipo_trainer import ViPOTrainer

PACKAGE = Path(trl_visual.__file__).parent

#: the floors, lowest first: each entry names modules, or packages (then every module under them), by prefix; the
#: longest prefix that matches a module gives its floor
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundations",
        (
            "trl_visual._upstream",
            "trl_visual._version",
            "trl_visual.core",
            "trl_visual.images",
            "trl_visual.preflight",
            "trl_visual.state_files",
            "trl_visual.validation",
        ),
    ),
    (
        "formats",
        (
            "trl_visual.checkpointing",
            "trl_visual.backbones",
            "trl_visual.lora_io",
            "trl_visual.miniature.scenes",
        ),
    ),
    ("miniature world", ("trl_visual.miniature", "trl_visual.testing")),
    (
        "families",
        (
            "trl_visual.models",
            "trl_visual.rewards",
            "trl_visual.miniature.reward",
            "trl_visual.named_backbones",
        ),
    ),
    ("edges", ("trl_visual.data", "trl_visual.hub")),
    (
        "trainer basics",
        (
            "trl_visual.trainer.diffusion_grpo_config",
            "trl_visual.trainer.bpgo_config",
            "trl_visual.trainer.vipo_config",
            "trl_visual.trainer.hooks",
            "trl_visual.trainer.seeds",
            "trl_visual.trainer.output_lock",
            "trl_visual.trainer.output_dir",
            "trl_visual.trainer.optional_packages",
            "trl_visual.trainer.prompt_sampler",
            "trl_visual.trainer.run_settings",
            "trl_visual.trainer.map_functions",
        ),
    ),
    ("trainer rooms", ("trl_visual.trainer",)),
    ("trainer", ("trl_visual.trainer.diffusion_grpo_trainer",)),
    ("methods", ("trl_visual.trainer.bpgo_trainer", "trl_visual.trainer.vipo_trainer")),
    ("combined methods", ("trl_visual.trainer.bpgo_vipo",)),
    ("trainer package", ("trl_visual.trainer.__init__",)),
    (
        "applications",
        (
            "trl_visual.__init__",
            "trl_visual.cli",
            "trl_visual.launcher",
            "trl_visual.demo",
            "trl_visual.miniature.train",
            "trl_visual.miniature.evaluate",
            "trl_visual.miniature.before_after",
        ),
    ),
]


def module_name(path: Path) -> str:
    """``trl_visual/trainer/__init__.py`` → ``trl_visual.trainer.__init__`` (a package's own file keeps its
    ``__init__``, so that a package and the modules under it can sit on different floors)."""
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


MODULES: dict[str, Path] = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    """The floor of ``module``: that of the longest prefix in :data:`FLOORS` it falls under."""
    best, best_length = None, -1
    for level, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = level, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_architecture.py")
    return best


def _target(module: str, name: str) -> str:
    """The module an import of ``name`` means: the module itself, else the package's ``__init__``."""
    if name in MODULES:
        return name
    if f"{name}.__init__" in MODULES:
        return f"{name}.__init__"
    return name.rpartition(".")[0] and _target(module, name.rpartition(".")[0])


def imports_of(module: str) -> list[tuple[str, int]]:
    """Every ``trl_visual`` module ``module`` imports, with the line: top-level, lazy and ``TYPE_CHECKING`` ones."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module.rpartition(".")[0]  # for `pkg.__init__` that is `pkg`, for `pkg.mod` too
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            names = [f"{origin}.{alias.name}" for alias in node.names]  # a submodule, or a name in `origin`
        else:
            continue
        for name in names:
            if name == "trl_visual" or name.startswith("trl_visual."):
                found.append((_target(module, name), node.lineno))
    return found


EDGES: dict[str, set[str]] = {
    module: {target for target, _ in imports_of(module)} - {module} for module in MODULES
}


def test_the_architecture_doc_lists_the_floors_in_order():
    """``docs/architecture.md``'s table of floors names the floors of :data:`FLOORS`, lowest first."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = doc.split("## The floors", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == [name for name, _ in FLOORS]


def test_every_module_has_a_floor():
    for module in MODULES:
        floor_of(module)


def test_no_import_climbs_to_a_higher_floor():
    upward = [
        f"{module}:{line} imports {target} ({FLOORS[floor_of(module)][0]} → {FLOORS[floor_of(target)][0]})"
        for module in MODULES
        for target, line in imports_of(module)
        if floor_of(target) > floor_of(module)
    ]
    assert not upward, "imports that climb a floor:\n" + "\n".join(upward)


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_circle_finder_finds_a_known_circle():
    """The check below could fail: a → b → c → a is found, the tail d → a is not part of it."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert _circles(EDGES) == [], "import circles"


def test_the_graph_is_read_from_every_kind_of_import():
    """Lazy (function-level) and relative imports are edges too: the walker sees the ones we know of."""
    assert "trl_visual.trainer.diffusion_grpo_trainer" in EDGES["trl_visual.trainer.bpgo_trainer"]
    lazy = {target for target, _ in imports_of("trl_visual.models.loading")}
    assert "trl_visual.testing" in lazy  # imported inside the `tiny:` loader


def test_production_code_reaches_the_test_pipelines_only_through_the_tiny_loader():
    importers = sorted(module for module, targets in EDGES.items() if "trl_visual.testing" in targets)
    assert importers == ["trl_visual.models.loading", "trl_visual.named_backbones"]


TRAINERS = [DiffusionGRPOTrainer, BPGOTrainer, ViPOTrainer, BPGOViPOTrainer]


def _trainer_methods() -> set[str]:
    import transformers

    return {
        name
        for name, value in vars(transformers.Trainer).items()
        if callable(value) or isinstance(value, property)
    }


def test_the_trainer_has_no_mixin():
    import transformers

    assert DiffusionGRPOTrainer.__bases__ == (transformers.Trainer,)


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.__name__)
def test_every_trainer_is_made_of_trainers_only(trainer):
    """No mixin on any trainer: each class of ours in a trainer's MRO is itself a trainer (BPGO-ViPO composes
    BPGO and ViPO through the hooks); what else a method needs is a collaborator object."""
    ours = [klass for klass in trainer.__mro__ if klass.__module__.startswith("trl_visual")]
    mixins = [klass.__name__ for klass in ours if not issubclass(klass, DiffusionGRPOTrainer)]
    assert not mixins, f"{trainer.__name__} inherits from {mixins}: make them collaborators"


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.__name__)
def test_only_diffusion_grpo_trainer_overrides_trainer_methods(trainer):
    """Every ``transformers.Trainer`` method we replace is replaced in one class, so the order of bases decides
    nothing: the methods compose through the hooks."""
    import transformers

    for klass in trainer.__mro__:
        if klass in (DiffusionGRPOTrainer, transformers.Trainer) or not klass.__module__.startswith(
            "trl_visual"
        ):
            continue
        overridden = sorted(set(vars(klass)) & _trainer_methods() - {"__init__"})
        assert not overridden, (
            f"{klass.__name__} overrides Trainer.{overridden}: override in DiffusionGRPOTrainer"
        )


def test_every_trainer_override_says_which_transformers_it_was_checked_against():
    """Each override in DiffusionGRPOTrainer carries its maintenance note, with the versions of
    :mod:`trl_visual._upstream` (the floor and the newest checked)."""
    from trl_visual._upstream import CHECKED_TRANSFORMERS

    note = f"Checked against transformers {CHECKED_TRANSFORMERS}"
    overrides = sorted(set(vars(DiffusionGRPOTrainer)) & _trainer_methods() - {"__init__"})
    assert overrides, "the trainer overrides no Trainer method?"
    missing = [name for name in overrides if note not in (getattr(DiffusionGRPOTrainer, name).__doc__ or "")]
    assert not missing, f"overrides without the note {note!r}: {missing}"


def test_the_trainer_file_stays_small():
    """The trainer orchestrates; its collaborators do the work (issue 27: at most 600 lines)."""
    lines = (PACKAGE / "trainer" / "diffusion_grpo_trainer.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 600, f"diffusion_grpo_trainer.py has {lines} lines: move work into a collaborator"
