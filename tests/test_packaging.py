"""The Python version the project states is one every pinned package installs on."""

import importlib.metadata
import re
import tomllib

import pytest
from conftest import REPO_ROOT
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Python versions a user might have; the lowest the pins accept must be the lowest pyproject allows
PYTHONS = [Version(f"3.{minor}") for minor in range(8, 16)]


def pins(path) -> dict[str, str]:
    """name -> version of every `name==version` line of a requirements file."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.split("#")[0].strip())
        if match:
            found[match[1]] = match[2]
    return found


def pinned_requires_python() -> dict[str, SpecifierSet]:
    """name -> Requires-Python of the installed pin (the metadata of the exact version requirements.txt names)."""
    required = {}
    for name, version in pins(REPO_ROOT / "requirements.txt").items():
        metadata = importlib.metadata.metadata(name)
        assert Version(metadata["Version"]).public == Version(version).public, (name, metadata["Version"], version)
        required[name] = SpecifierSet(metadata.get("Requires-Python") or "")
    return required


def lowest_python(specifiers: list[SpecifierSet]) -> Version:
    """The oldest Python of PYTHONS that every specifier accepts."""
    return next(v for v in PYTHONS if all(s.contains(v, prereleases=True) for s in specifiers))


def project_requires_python() -> SpecifierSet:
    return SpecifierSet(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"])


def test_every_requirement_is_pinned_and_installed():
    required = pinned_requires_python()
    assert {"torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"} <= set(required)


def test_pyproject_python_is_the_lowest_the_pins_install_on():
    required = pinned_requires_python()
    needed = lowest_python(list(required.values()))
    older = PYTHONS[PYTHONS.index(needed) - 1]
    strictest = sorted(name for name, spec in required.items() if not spec.contains(older))
    stated = lowest_python([project_requires_python()])
    assert stated == needed, f"pyproject allows Python {stated}, but {', '.join(strictest)} need {needed}"


@pytest.mark.parametrize("stated", [">=3.10", ">=3.12"])
def test_a_wrong_statement_is_caught(stated):
    """The check above fails for a promise the pins break (3.10) and for one stricter than they need (3.12)."""
    assert lowest_python([SpecifierSet(stated)]) != lowest_python(list(pinned_requires_python().values()))


def test_every_install_command_outside_the_requirements_names_its_version():
    """Each pip command that installs a package in the code and configs (the optional extras: deepspeed) pins a
    version, the same one everywhere, so "the pinned stack" holds for what the project tells users to install."""
    from lora_recipes.config import DEEPSPEED

    files = [path for pattern in ("*.py", "*.yaml", "*.sh", "*.ipynb") for path in REPO_ROOT.rglob(pattern)
             if not {".venv", ".git", "outputs"} & set(path.relative_to(REPO_ROOT).parts)]
    installs = {}
    for path in files:
        text = path.read_text(errors="ignore")
        for package in re.findall(r"pip install ([A-Za-z][\w.\-\[\]]*(?:==[\w.]+)?)", text):
            installs.setdefault(package.split("==")[0], set()).add(package)
    assert "deepspeed" in installs
    assert {name: found for name, found in installs.items() if not all("==" in p for p in found)} == {}
    assert {name: found for name, found in installs.items() if len(found) > 1} == {}
    assert installs["deepspeed"] == {DEEPSPEED}
