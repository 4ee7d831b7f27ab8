"""A fourth domain by following the README's "New domain" section literally, in a copy of the repository."""

import json
import random
import re
import shlex
import shutil
import subprocess

from conftest import REPO_ROOT, log_history, run_recipe

# What the section says to change in the copied data module: everything below its imports.
INSURANCE = '''SYSTEM_PROMPT = "You are an insurance claims assistant. Decide from the policy and the claim; say why."
EVAL_ONLY = ()


def claim_to_messages(example: dict) -> dict:
    """A claims log: policy, claim, decision (pay or deny; empty while pending), reason."""
    decision = example["decision"].strip().lower()
    if not decision:
        raise DropRow("pending (no decision)")
    if decision not in ("pay", "deny"):
        raise FieldError("decision", f"expected pay or deny, got '{example['decision']}'")
    user = f"Policy: {clean_text(example['policy'])}\\nClaim: {clean_text(example['claim'])}\\nShould it be paid?"
    return chat(SYSTEM_PROMPT, user, f"{decision.capitalize()}. {clean_text(example['reason'])}")


SCHEMAS = [
    Schema("claim", {"policy": str, "claim": str, "decision": str, "reason": str}, claim_to_messages),
    MESSAGES,
]
'''
POLICIES = [("home", "water damage from a burst pipe", "pay", "sudden escape of water is covered"),
            ("home", "damp from a slow leak over months", "deny", "gradual damage is excluded"),
            ("car", "windscreen cracked by a stone", "pay", "glass cover applies"),
            ("car", "engine failure from wear", "deny", "mechanical breakdown is excluded"),
            ("travel", "flight cancelled by the airline", "pay", "cancellation cover applies"),
            ("travel", "trip cancelled after changing my mind", "deny", "disinclination to travel is excluded")]


def claims(n: int = 48) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        policy, claim, decision, reason = POLICIES[i % len(POLICIES)]
        rows.append({"policy": f"{policy} insurance, excess {rng.choice([100, 250, 500])} (synthetic)",
                     "claim": f"Claim {i}: {claim}.", "decision": "" if i % 12 == 5 else decision,
                     "reason": f"<p>{reason.capitalize()} under the {policy} policy.</p>"})
    return rows + rows[:4]  # four rows logged twice


def section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_new_domain_by_copying_three_files(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "runs", "wandb", "__pycache__", ".pytest_cache", "*.pyc"))
    copy, run = re.findall(r"```bash\n(.*?)```", section("New domain"), re.DOTALL)
    assert len([line for line in copy.splitlines() if line.startswith("cp ")]) <= 4  # the copy list stays short

    # 1. The copy commands, as written
    subprocess.run(["bash", "-euo", "pipefail", "-c", copy], cwd=repo, check=True)
    assert "from data import insurance" in (repo / "recipes" / "sft_insurance.py").read_text()
    # 2. The change: the copied module keeps its docstring and imports, everything below them is the new domain's
    module = repo / "data" / "insurance.py"
    module.write_text(module.read_text().split("\nSYSTEM_PROMPT = ")[0] + "\n" + INSURANCE)
    rows = claims()
    (repo / "my_claims.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # 3. The run command, as written, cut to a few steps
    argv = shlex.split(run.replace("\\\n", " "))
    assert argv[:2] == ["accelerate", "launch"]
    proc = run_recipe(*argv[2:], "--max_steps", "8", "--logging_steps", "2", "--eval_steps", "8", "--save_steps",
                      "8", cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]

    output_dir = repo / argv[argv.index("--output_dir") + 1]
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "data_card.md"):
        assert (output_dir / name).is_file(), name
    losses = [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]
    assert len(losses) == 4 and losses[0] > losses[-1] + 1.0, losses
    run_card = json.loads((output_dir / "run_card.json").read_text())
    assert run_card["recipe"] == "sft_insurance.py" and run_card["config"]["model"]["load_in_4bit"] is True
    (source,) = run_card["data"]
    decided = [json.dumps(row) for row in rows if row["decision"]]
    assert (source["schema"], source["read"]) == ("claim", len(rows))
    assert source["dropped"] == {"pending (no decision)": len(rows) - len(decided),
                                 "duplicate": len(decided) - len(set(decided))}
    assert source["kept"] == source["train"] + source["eval"] == len(set(decided))
