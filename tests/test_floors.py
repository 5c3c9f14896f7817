"""The floors job installs exactly the floors ``setup.cfg`` declares: ``.ci/floors-constraints.txt`` is generated
from ``install_requires`` and must agree with it."""

import importlib.util
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_floors_constraints", ROOT / ".ci" / "make_floors_constraints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_file_agrees_with_setup_cfg():
    script = _script()
    assert script.CONSTRAINTS.read_text() == script.render(), (
        ".ci/floors-constraints.txt disagrees with setup.cfg: run `python .ci/make_floors_constraints.py`"
    )
    assert script.main(["--check"]) == 0


def test_every_floor_of_a_library_we_build_on_is_pinned_exactly():
    """Each ``>=`` floor of install_requires (torch aside, see the script) is a ``==`` line of the constraints,
    and nothing else is."""
    script = _script()
    pinned = {}
    for line in script.CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pinned[requirement.name] = spec.version
    declared = {r.name: r for r in script.install_requires()}
    for name in ("trl", "transformers", "diffusers", "accelerate", "peft", "datasets", "huggingface_hub"):
        assert name in pinned, f"{name} has no floor in setup.cfg's install_requires"
    for name, floor in pinned.items():
        assert f">={floor}" in str(declared[name].specifier), (name, floor, declared[name])


def test_check_mode_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    script = _script()
    stale = tmp_path / "floors-constraints.txt"
    stale.write_text(script.render().replace("==", "==0", 1))
    monkeypatch.setattr(script, "CONSTRAINTS", stale)
    assert script.main(["--check"]) == 1
    assert "is stale" in capsys.readouterr().err
