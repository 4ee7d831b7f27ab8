"""Start a new domain from commented templates, in the spirit of torchtune's `tune cp`; it trains offline at once.

    python recipes/new_domain.py insurance

writes, from lora_recipes/domain_template/:
    recipes/sft_insurance.py                the recipe; it trains on data/insurance.py (sft_<name> <-> data/<name>)
    data/insurance.py                       system prompt, one converter, SCHEMAS, empty EVAL_ONLY and EVAL_SETS
    recipes/configs/insurance.yaml          the real run; stops in one line until dataset_name is filled in
    recipes/configs/insurance_smoke.yaml    the offline demo: the tiny bundled model on the sample rows
    data/samples/insurance/examples.jsonl   three sample rows in the converter's format

The name is a lowercase Python identifier (it is imported as data.<name>). An existing name is refused and nothing
is written. What to change next: docs/new_domain.md.
"""

import argparse
import keyword
import re
import sys
from pathlib import Path
from string import Template

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone: no install step

from lora_recipes.errors import RecipeError, exit_on_recipe_error  # noqa: E402

TEMPLATES = REPO / "lora_recipes" / "domain_template"
# template -> the file it becomes, for a domain `name`
FILES = {
    "sft_domain.py.tmpl": "recipes/sft_{name}.py",
    "domain.py.tmpl": "data/{name}.py",
    "domain.yaml.tmpl": "recipes/configs/{name}.yaml",
    "domain_smoke.yaml.tmpl": "recipes/configs/{name}_smoke.yaml",
    "examples.jsonl": "data/samples/{name}/examples.jsonl",
}


def targets(name: str, root: Path) -> dict[str, Path]:
    """template -> the path it is written to."""
    return {template: root / path.format(name=name) for template, path in FILES.items()}


def check_name(name: str, root: Path) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise RecipeError(f"'{name}': a domain name is a lowercase Python identifier (a-z, 0-9, _, starting with a "
                          "letter), such as insurance: it is imported as data.<name>")
    taken = [path for path in [root / "data" / name, *targets(name, root).values()] if path.exists()]
    if taken:
        raise RecipeError(f"'{name}' exists already ({', '.join(str(p.relative_to(root)) for p in taken)}): choose "
                          "another name; nothing was written")


def write_domain(name: str, root: Path = REPO) -> list[Path]:
    """Write the new domain's files from the templates; returns their paths."""
    check_name(name, root)
    words = {"domain": name, "title": name.replace("_", " "), "Title": name.replace("_", " ").capitalize()}
    written = []
    for template, path in targets(name, root).items():
        text = (TEMPLATES / template).read_text(encoding="utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(words) if template.endswith(".tmpl") else text, encoding="utf-8")
        written.append(path)
    return written


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the domain, a lowercase Python identifier (insurance, tax_law)")
    name = parser.parse_args(argv).name
    for path in write_domain(name):
        print(f"wrote {path.relative_to(REPO)}")
    print(f"offline demo: accelerate launch recipes/sft_{name}.py --config recipes/configs/{name}_smoke.yaml\n"
          f"then: your converter in data/{name}.py, your dataset_name in recipes/configs/{name}.yaml "
          "(docs/new_domain.md)")


if __name__ == "__main__":
    main()
