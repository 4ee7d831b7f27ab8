"""A new domain as docs/new_domain.md says, in a copy of the repository: the page's commands, read from the page and
run as written (scaffold, offline training, evaluation), then what they wrote, trained and scored."""

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT, log_history, run_recipe

from lora_recipes.config import parse_args
from lora_recipes.errors import RecipeError
from lora_recipes.run_card import config_dict

DOC = REPO_ROOT / "docs" / "new_domain.md"
# Keys that name the run rather than set it
NAMING = {"output_dir", "logging_dir", "run_name"}


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.DOTALL)


def later_commands() -> list[str]:
    """The commands of the page's other bash blocks, one line each."""
    return [line for block in bash_blocks()[1:] for line in block.strip().splitlines()]


def run_line(line: str, cwd) -> subprocess.CompletedProcess:
    """One command of the page as a user types it: `accelerate launch ...` or `python ...`, with this interpreter."""
    argv = shlex.split(line)
    if argv[:2] == ["accelerate", "launch"]:
        return run_recipe(*argv[2:], cwd=cwd, quiet=True)
    assert argv[0] == "python", line
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=900)


def copy_of_repository(root):
    repo = root / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "runs", "wandb", "__pycache__", ".pytest_cache", "*.pyc"))
    return repo


def new_domain_script():
    """recipes/new_domain.py as a module (recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location("new_domain", REPO_ROOT / "recipes" / "new_domain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def followed(tmp_path_factory):
    """(copy of the repository, the page's first command block as argv lists, their processes), run in order."""
    repo = copy_of_repository(tmp_path_factory.mktemp("new-domain"))
    commands, procs = bash_blocks()[0].strip().splitlines(), []
    for line in commands:
        procs.append(run_line(line, repo))
        assert procs[-1].returncode == 0, f"{line}\n{procs[-1].stderr[-3000:]}"
    return repo, [shlex.split(line) for line in commands], procs


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_page_scaffolds_trains_and_evaluates_the_domain_on_its_own_data(followed):
    repo, (scaffold, train, evaluate), _ = followed
    assert scaffold[:2] == ["python", "recipes/new_domain.py"]
    name = scaffold[2]
    written = {template: repo / path.format(name=name) for template, path in new_domain_script().FILES.items()}
    assert all(path.is_file() for path in written.values()), written
    assert f"from data import {name}" in (repo / "recipes" / f"sft_{name}.py").read_text()
    # the generated code is as clean as the project's
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", f"recipes/sft_{name}.py", f"data/{name}.py"],
                          cwd=repo, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout

    samples = [json.loads(line) for line in (repo / "data" / "samples" / name / "examples.jsonl").open()]
    assert len(samples) == 3

    # training: the smoke config's output_dir, trained on the sample rows, loss falling
    smoke = repo / flag(train, "--config")
    output_dir = repo / yaml.safe_load(smoke.read_text())["output_dir"]
    assert output_dir == repo / flag(evaluate, "--adapter")
    for file in ("adapter_model.safetensors", "adapter_config.json", "run_card.json", "data_card.md"):
        assert (output_dir / file).is_file(), file
    losses = [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]
    assert len(losses) >= 4 and losses[0] > losses[-1], losses
    card = json.loads((output_dir / "run_card.json").read_text())
    assert card["recipe"] == f"sft_{name}.py" and card["base_model"] == "data/tiny-llama"
    (source,) = card["data"]
    assert (source["source"], source["schema"], source["read"]) == (f"data/samples/{name}/examples.jsonl", "qa", 3)
    assert source["train"] + source["eval"] == 3 and source["train"] >= 1 and source["eval"] >= 1

    # evaluation: only the held-out split of the samples, the rows training held out; no other domain's sets
    report = json.loads((repo / flag(evaluate, "--output_dir") / "eval_report.json").read_text())
    assert list(report["tasks"]) == ["held_out"] and report["skipped"] == []
    task = report["tasks"]["held_out"]
    assert task["n"] == source["eval"] and task["kind"] == "open"
    by_question = {row["question"]: row["answer"] for row in samples}
    assert all(by_question[example["prompt"]] == example["reference"] for example in task["examples"])
    assert task["metrics"]["loss"]["adapter"] < task["metrics"]["loss"]["base"]
    at_training_end = json.loads((output_dir / "eval_report.json").read_text())["tasks"]
    assert list(at_training_end) == ["held_out"]
    assert [e["prompt"] for e in at_training_end["held_out"]["examples"]] == [e["prompt"] for e in task["examples"]]


def test_the_real_config_stops_in_one_line_until_its_placeholder_is_filled(followed):
    repo, (scaffold, _, _), _ = followed
    name = scaffold[2]
    launch = next(shlex.split(line) for line in later_commands()
                  if line == f"accelerate launch recipes/sft_{name}.py")  # the page's real-run command
    proc = run_line(shlex.join(launch), repo)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # 1: the launcher's status for any failure
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    config = repo / "recipes" / "configs" / f"{name}.yaml"
    assert error.startswith(f"error: {config}: dataset_name is still the placeholder ['YOUR_ORG/YOUR_DATASET']: ")
    # filled in on the command line, the same YAML parses
    data_args, _, _ = parse_args(config, ["--dataset_name", "my_claims.jsonl", "--use_cpu", "true"])
    assert data_args.dataset_name == ["my_claims.jsonl"]


def test_the_real_config_keeps_the_medical_recipe_settings(followed):
    repo, (scaffold, _, _), _ = followed
    fill = ["--dataset_name", "my_claims.jsonl", "--use_cpu", "true"]
    new = parse_args(repo / "recipes" / "configs" / f"{scaffold[2]}.yaml", fill)
    medical = parse_args(REPO_ROOT / "recipes" / "configs" / "medical.yaml", fill)
    for new_args, medical_args in zip(new[1:], medical[1:], strict=True):  # training, model
        new_settings, medical_settings = config_dict(new_args), config_dict(medical_args)
        assert {k: v for k, v in new_settings.items() if k not in NAMING} == {
            k: v for k, v in medical_settings.items() if k not in NAMING}


def test_an_existing_name_is_refused_and_nothing_is_written(followed):
    repo, (scaffold, _, _), _ = followed
    before = {path: path.read_bytes() for path in repo.rglob("*") if path.is_file()}
    proc = run_line(shlex.join(scaffold), repo)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: '{scaffold[2]}' exists already (recipes/sft_{scaffold[2]}.py, data/{scaffold[2]}.py, "
        f"recipes/configs/{scaffold[2]}.yaml, recipes/configs/{scaffold[2]}_smoke.yaml, "
        f"data/samples/{scaffold[2]}/examples.jsonl): choose another name; nothing was written"]
    assert {path: path.read_bytes() for path in repo.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(("name", "message"), [
    ("medical", "'medical' exists already (data/medical.py"),  # a shipped domain
    ("samples", "'samples' exists already (data/samples)"),  # a folder of data/
    ("Insurance", "a domain name is a lowercase Python identifier"),
    ("car-insurance", "a domain name is a lowercase Python identifier"),
    ("2insurance", "a domain name is a lowercase Python identifier"),
    ("class", "a domain name is a lowercase Python identifier"),  # a keyword cannot be imported as data.class
])
def test_a_taken_or_invalid_name_is_refused(tmp_path, name, message):
    script = new_domain_script()
    root = tmp_path / "repo"
    for folder in ("recipes/configs", "data/samples"):
        (root / folder).mkdir(parents=True)
    (root / "data" / "medical.py").write_text("")
    with pytest.raises(RecipeError, match=re.escape(message)):
        script.write_domain(name, root)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "data", "data/medical.py", "data/samples", "recipes", "recipes/configs"]


def test_the_data_card_command_shows_what_the_converter_made_of_a_file(followed):
    repo, (scaffold, _, _), _ = followed
    (line,) = [line for line in later_commands() if "--data_card_only" in line]
    argv = shlex.split(line)
    rows = [{"question": f"Is claim {i} covered?", "answer": f"Claim {i} is covered."} for i in range(12)]
    (repo / flag(argv, "--dataset_name")).write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = run_line(line, repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (repo / flag(argv, "--output_dir") / "data_card.md").read_text()
    assert flag(argv, "--dataset_name") in card
    assert not (repo / flag(argv, "--output_dir") / "adapter_model.safetensors").exists()  # no model loaded


def test_chat_rows_train_as_they_are_without_the_recipe_system_prompt(tmp_path):
    """The page's `messages` row, through a recipe's schemas: its turns unchanged, the recipe's prompt not added."""
    from data import finance
    from lora_recipes.data import prepare_data

    (example,) = re.findall(r"```json\n(.*?)\n```", DOC.read_text(), re.DOTALL)
    row = json.loads(example)
    without_system = {"messages": [{"role": "user", "content": "Is hail damage to a parked car covered?"},
                                   {"role": "assistant", "content": "Yes, under comprehensive cover."}]}
    chats = tmp_path / "my_chats.jsonl"
    chats.write_text(json.dumps(row) + "\n" + json.dumps(without_system) + "\n")
    data = prepare_data([str(chats)], finance.SCHEMAS, eval_fraction=0.0)
    assert data.sources[0].schema == "messages"
    assert sorted(map(json.dumps, list(data.train["messages"]))) == sorted([json.dumps(row["messages"]),
                                                                      json.dumps(without_system["messages"])])
    assert finance.SYSTEM_PROMPT not in json.dumps(list(data.train["messages"]))
