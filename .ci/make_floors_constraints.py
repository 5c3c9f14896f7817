"""Write ``.ci/floors-constraints.txt``: each lower bound of ``setup.cfg``'s ``install_requires`` as ``pkg==floor``,
so that ``pip install -c .ci/floors-constraints.txt -e .`` installs exactly the declared floors (the floors job of
``.ci/run``). ``python .ci/make_floors_constraints.py --check`` fails when the file is stale; ``tests/test_floors.py``
runs that check.

torch is left out: its floor (``torch>=2.4``) is a range for GPU users, and CI installs the CPU build
``torch==2.13.0`` first (the only CPU wheel this machine has), so the floors job runs on that torch.
"""

from __future__ import annotations

import argparse
import configparser
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
SETUP_CFG = ROOT / "setup.cfg"
CONSTRAINTS = ROOT / ".ci" / "floors-constraints.txt"
#: install_requires entries whose floor the job does not pin (see the module docstring)
NOT_PINNED = {"torch"}
HEADER = "# Generated from setup.cfg by `python .ci/make_floors_constraints.py`; do not edit by hand.\n"


def install_requires(setup_cfg: Path = SETUP_CFG) -> list[Requirement]:
    """The requirements in ``setup.cfg``'s ``[options] install_requires``."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser["options"]["install_requires"].splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def floors(requirements: list[Requirement]) -> dict[str, str]:
    """``{name: floor}`` for every requirement with a ``>=`` bound (those without one, e.g. pillow, are free)."""
    found = {}
    for requirement in requirements:
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if lower and requirement.name not in NOT_PINNED:
            found[requirement.name] = lower[0]
    return found


def render(setup_cfg: Path = SETUP_CFG) -> str:
    """The constraints file's text."""
    return HEADER + "".join(
        f"{name}=={floor}\n" for name, floor in floors(install_requires(setup_cfg)).items()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs from setup.cfg")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not CONSTRAINTS.is_file() or CONSTRAINTS.read_text() != text:
            print(f"{CONSTRAINTS} is stale: run `python .ci/make_floors_constraints.py`", file=sys.stderr)
            return 1
        return 0
    CONSTRAINTS.write_text(text)
    print(f"wrote {CONSTRAINTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
