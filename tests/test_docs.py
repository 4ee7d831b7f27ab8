"""The README and every docs/ page: each repository path and link they name exists, and each command in their
`bash` blocks is one the project can run: a script's flags are parsed by that script's own parser, without running
it, and the files it names exist."""

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
TOP_LEVEL = ("recipes/", "data/", "lora_recipes/", "tests/", "accelerate_configs/", "notebooks/", "bench/", ".ci/",
             "docs/")
# a path written as a pattern (`recipes/sft_<name>.py`) names no file
PATH = re.compile(r"(?<![\w/.-])((?:" + "|".join(re.escape(t) for t in TOP_LEVEL) + r")[\w./*-]*)(?![\w./*<-])")
LINK = re.compile(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)")
BASH = re.compile(r"```bash\n(.*?)```", re.DOTALL)
SCAFFOLD = re.compile(r"python recipes/new_domain\.py (\w+)")
# programs a doc may name that the project does not ship: checked only for the files they name
OUTSIDE = {"ollama", "llama-cli", "jupyter", "hf", "tensorboard", "sbatch"}


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def named_paths(doc: Path) -> set[str]:
    """Repository paths a doc names, except those its own `python recipes/new_domain.py NAME` creates."""
    text = doc.read_text()
    created = set(SCAFFOLD.findall(text))
    return {p.rstrip(".,):") for p in PATH.findall(text)
            if not any(name in Path(p).name or name in Path(p).parts for name in created)}


def test_the_docs_are_the_readme_and_one_page_per_task():
    pages = {p.name for p in DOCS}
    assert {"README.md", "data.md", "configuration.md", "distributed.md", "evaluation.md", "deploy.md",
            "reliability.md", "performance.md", "tests.md"} <= pages
    readme = (REPO_ROOT / "README.md").read_text()
    for page in (REPO_ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme or page.name == "README.md", f"README does not link {page.name}"
    assert "(docs/new_domain.md)" in readme  # written on its own branch; linked from here
    assert len(readme.split()) <= 1500


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_path_a_doc_names_exists(doc):
    paths = named_paths(doc)
    assert paths or doc.name == "README.md" and doc.parent.name == "docs"
    missing = [p for p in sorted(paths) if not any(REPO_ROOT.glob(p.rstrip("/")))]
    assert not missing, f"{doc_id(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_relative_link_resolves(doc):
    missing = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{doc_id(doc)} links to files that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------
def commands(doc: Path) -> list[list[str]]:
    """Every command of every `bash` block: continuation lines joined, comments dropped, `A && B` split."""
    found = []
    for block in BASH.findall(doc.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(words[:cut])
                words = words[cut + 1:]
    return found


def test_the_docs_have_commands():
    assert sum(len(commands(doc)) for doc in DOCS) >= 40
    for doc in DOCS:
        if doc.parent.name == "docs" and doc.name not in ("README.md", "new_domain.md"):
            assert doc.read_text().split("\n## ")[0].count("```bash") == 1, f"{doc_id(doc)} starts with its commands"


def load_script(script: str):
    path = REPO_ROOT / script
    spec = importlib.util.spec_from_file_location(f"docs_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELP = {}


def help_text(command: list[str]) -> str:
    key = tuple(command)
    if key not in HELP:
        proc = subprocess.run([sys.executable, *command, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        HELP[key] = proc.stdout
    return HELP[key]


def flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def parse_script(script: str, args: list[str]) -> None:
    """Parse `args` as `script` would, with its own parser, stopping before it does anything."""
    path = REPO_ROOT / script
    assert path.is_file(), f"{script}: no such script"
    if re.fullmatch(r"recipes/sft_\w+\.py", script):
        from lora_recipes.config import parse_args

        # TrlParser over the recipe's YAML and the flags; GPU configs are parsed as a CPU run (bf16 needs a GPU)
        parse_args(REPO_ROOT / "recipes" / "configs" / f"{path.stem[4:]}.yaml", [*args, "--use_cpu", "true"])
    elif script == "recipes/evaluate.py":
        from transformers import HfArgumentParser

        HfArgumentParser(load_script(script).EvalArguments).parse_args_into_dataclasses(args)
    elif script == "recipes/plan_memory.py":
        load_script(script).parse(args)
    elif script in ("recipes/chat.py", "recipes/merge.py", "recipes/export_gguf.py"):
        module, parsed = load_script(script), []
        module.main = lambda *dataclasses: parsed.append(dataclasses)  # run() parses, then calls main
        module.run(args)
        assert parsed
    elif flags(args):  # argparse scripts without a parser to import: the flags must be ones their --help lists
        text = help_text([script])
        unknown = [f for f in flags(args) if not re.search(re.escape(f) + r"\b", text)]
        assert not unknown, f"{script} does not take {unknown}"


def check_command(words: list[str]) -> None:
    env = 0
    while env < len(words) and re.fullmatch(r"[A-Z_]+=\S*", words[env]):
        env += 1
    program, args = words[env], words[env + 1:]
    if program == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert args[0] == "launch", words
        launch = launch_command_parser().parse_args(args[1:])
        assert launch.config_file is None or (REPO_ROOT / launch.config_file).is_file(), launch.config_file
        parse_script(launch.training_script, launch.training_script_args)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        run = get_args_parser().parse_args(args)
        parse_script(run.training_script, run.training_script_args)
    elif program == "python" and args[:2] == ["-m", "pytest"]:
        paths = [a for i, a in enumerate(args[2:], 2)
                 if not a.startswith("-") and args[i - 1] not in ("-m", "-k", "-n", "--dist")]
        assert all((REPO_ROOT / a.split("::")[0]).exists() for a in paths), paths
        text = help_text(["-m", "pytest"])  # -n and --dist exist only with pytest-xdist installed
        assert all(f in text for f in flags(args[2:])), flags(args[2:])
    elif program == "python" and args[0] == "-m":
        module = args[1]
        assert importlib.util.find_spec(module) is not None, module
        if flags(args[2:]):
            text = help_text(["-m", module])
            assert all(f in text for f in flags(args[2:])), (module, text)
    elif program == "python":
        parse_script(args[0], args[1:])
    elif program == "pip":
        pins = dict(line.split("==") for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
        for i, arg in enumerate(args):
            if args[i - 1] == "-r":
                assert (REPO_ROOT / arg).is_file(), arg
            elif "==" in arg:
                name, version = arg.split("==")
                assert pins.get(name) == version, f"{arg}: requirements.txt pins {name}=={pins.get(name)}"
    elif program.endswith(".sh"):
        script = (REPO_ROOT / program).read_text()
        assert all(f in script for f in flags(args)), (program, flags(args))
        assert "--dry_run" in args, "only a dry run can be checked here"  # it prints the per-node commands
        proc = subprocess.run([program, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    elif program in OUTSIDE:
        if program == "sbatch":
            script = next(a for a in args if a.endswith(".sh"))
            text = (REPO_ROOT / script).read_text()
            rest = args[args.index(script) + 1:]
            assert all(f in text for f in flags(rest)), (script, flags(rest))
        if program == "jupyter":
            assert (REPO_ROOT / args[-1]).is_dir(), args
    else:
        raise AssertionError(f"a command the docs test does not know how to check: {shlex.join(words)}")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_command_in_a_doc_parses(doc, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    created = set(SCAFFOLD.findall(doc.read_text()))
    failures = []
    for words in commands(doc):
        if "recipes/new_domain.py" not in words and any(name in word for name in created for word in words):
            continue  # it runs the files the scaffold command writes: tests/test_new_domain.py runs it as written
        try:
            check_command(words)
        except (Exception, SystemExit) as e:  # argparse exits on an unknown flag
            first_line = str(e).splitlines()[0] if str(e) else ""
            failures.append(f"{shlex.join(words)}\n    -> {type(e).__name__}: {first_line}")
    assert not failures, f"{doc_id(doc)}:\n" + "\n".join(failures)
