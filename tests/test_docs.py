"""Every repository path the README names exists."""

import re

from conftest import REPO_ROOT

TOP_LEVEL = ("recipes/", "data/", "lora_recipes/", "tests/", "accelerate_configs/", "notebooks/", "bench/", ".ci/")
PATH = re.compile(r"(?<![\w/.-])((?:" + "|".join(re.escape(t) for t in TOP_LEVEL) + r")[\w./*-]*)")


CP = re.compile(r"^cp \S+ (\S+)$", re.MULTILINE)


def readme_paths() -> set[str]:
    """Paths the README names, except those its own `cp SRC DST` commands create (the new-domain copy)."""
    text = (REPO_ROOT / "README.md").read_text()
    return {p.rstrip(".,)") for p in PATH.findall(text)} - set(CP.findall(text))


def test_readme_names_paths():
    assert len(readme_paths()) > 10


def test_every_path_in_readme_exists():
    missing = []
    for path in sorted(readme_paths()):
        pattern = path.rstrip("/")
        if not any(REPO_ROOT.glob(pattern)):
            missing.append(path)
    assert not missing, f"README names paths that do not exist: {missing}"
