"""The model card of an adapter or a merged model, from the run's own records, and the Hub upload that carries it.

Everything in the card comes from files the run wrote: `run_card.json` (base model, data sources with row
counts, LoRA, quantisation and training settings, final losses), `adapter_config.json` (the LoRA modules) and,
when there is one, `eval_report.json` (base vs adapter on each evaluation task, with confidence intervals).
"""

import json
import re
from pathlib import Path

from .errors import RecipeError
from .inference import TrainedAdapter, load_tokenizer, read_json
from .templates import end_of_turn_token

EVAL_REPORT = "eval_report.json"
EVAL_FIELDS = {"metric": str, "n": int, "base": (int, float), "adapter": (int, float)}
CI_FIELDS = ("base_ci", "adapter_ci", "delta_ci")
LIMITATIONS = """\
- Medical, legal and financial answers from this model are **not professional advice**. They can be wrong,
  outdated or incomplete, and sound confident when they are. Do not use them to diagnose, treat, sign, invest or
  decide anything on their own: check with a qualified professional.
- Intended for research, education and prototyping of domain assistants, with a person reviewing the output.
- The model inherits the biases and the knowledge cut-off of its base model and of the training sources above;
  it has not been checked for safety beyond the evaluation reported here.
- Multiple-choice training sources teach the answer format of those exams; free-form questions from real users
  are a different distribution."""


def read_eval_report(folder: Path) -> dict | None:
    """`eval_report.json` next to the adapter, checked field by field; None when there is none."""
    path = Path(folder) / EVAL_REPORT
    if not path.is_file():
        return None
    report = read_json(path)
    tasks = report.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise RecipeError(f"{path}: field 'tasks': expected a non-empty object of task -> results")
    for task, result in tasks.items():
        if not isinstance(result, dict):
            raise RecipeError(f"{path}: task '{task}': expected an object, got {type(result).__name__}")
        for key, kind in EVAL_FIELDS.items():
            if not isinstance(result.get(key), kind) or isinstance(result.get(key), bool):
                raise RecipeError(f"{path}: task '{task}': field '{key}': expected {_kind_name(kind)}, got "
                                  f"{result.get(key)!r}")
        for key in CI_FIELDS:
            ci = result.get(key)
            if ci is not None and not (isinstance(ci, list) and len(ci) == 2
                                       and all(isinstance(v, (int, float)) for v in ci)):
                raise RecipeError(f"{path}: task '{task}': field '{key}': expected [low, high], got {ci!r}")
    return report


def _kind_name(kind) -> str:
    return "a number" if isinstance(kind, tuple) else "a string" if kind is str else "an integer"


def domain_of(run_card: dict) -> str:
    match = re.fullmatch(r"sft_(\w+)\.py", run_card.get("recipe", ""))
    return match.group(1) if match else "domain"


def _value(value: float, ci: list | None) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def render(adapter: TrainedAdapter, *, kind: str, name: str, eval_report: dict | None = None,
           merge: dict | None = None) -> str:
    """The model card (README.md) of an adapter (`kind="adapter"`) or a merged model (`kind="merged"`)."""
    run_card, adapter_config = adapter.run_card, read_json(adapter.path / "adapter_config.json")
    model, training = run_card["config"]["model"], run_card["config"]["training"]
    metrics = run_card.get("metrics", {})
    domain = domain_of(run_card)
    base = run_card["base_model"]
    targets = sorted({m.rsplit(".", 1)[-1] for m in adapter_config["target_modules"]})
    synthetic = any(str(s["source"]).startswith("data/samples/") for s in run_card["data"])

    lines = [
        "---",
        f"base_model: {base}",
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        "pipeline_tag: text-generation",
        f"tags: [lora, {'qlora, ' if model['load_in_4bit'] else ''}trl, sft, {domain}, lora-recipes]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {domain} assistant: {'a LoRA adapter for' if kind == 'adapter' else 'a LoRA adapter merged into'} "
        f"`{base}`, fine-tuned with the lora-recipes `{run_card.get('recipe')}` recipe (TRL `SFTTrainer` + PEFT"
        f"{', commit ' + run_card['git_commit'][:12] if run_card.get('git_commit') else ''}).",
        "",
        "> **Not professional advice.** Medical, legal and financial answers from this model are not a substitute "
        "for a qualified professional. See *Intended use and limitations*.",
        "",
    ]
    if synthetic:
        lines += ["> Trained on the SYNTHETIC sample rows bundled with lora-recipes: this is a pipeline demo, not a "
                  "usable model.", ""]

    lines += ["## Training", ""] + _table(["setting", "value"], [
        ["base model", f"`{base}`"],
        ["quantisation of the base in training", adapter.quantization],
        ["LoRA", f"r={adapter_config['r']}, alpha={adapter_config['lora_alpha']}, dropout="
                 f"{adapter_config['lora_dropout']}, rsLoRA {'yes' if adapter_config['use_rslora'] else 'no'}, "
                 f"DoRA {'yes' if adapter_config['use_dora'] else 'no'}"],
        ["LoRA modules", ", ".join(targets)],
        ["loss", "assistant turns only" if training["assistant_only_loss"] else "whole sequence"],
        ["schedule", f"learning rate {training['learning_rate']} ({training['lr_scheduler_type']}), global batch "
                     f"{run_card.get('global_batch_size')}, max length {training['max_length']}, "
                     f"{metrics.get('epoch', 0):.2f} epochs"],
        ["final loss", ", ".join(f"{k.removesuffix('_loss')} {metrics[k]:.3f}" for k in ("train_loss", "eval_loss")
                                 if k in metrics) or "not recorded"],
        ["packages", ", ".join(f"{k} {v}" for k, v in run_card.get("versions", {}).items())],
    ]) + [""]

    if merge is not None:
        lines += ["## Merge", "", merge["description"], "",
                  f"Checked before export: the merged model's logits differ from base + adapter by at most "
                  f"{merge['max_logit_difference']:.4g} on {merge['prompts']} chat prompts (tolerance "
                  f"{merge['tolerance']:.4g}; the adapter itself moves them by up to {merge['adapter_effect']:.4g}).",
                  ""]

    lines += ["## Data", "", "Row counts as the run recorded them (`read` rows in the source, `kept` after the "
              "drops listed, then split into `train` and `eval`).", ""] + _table(
        ["source", "schema", "read", "kept", "dropped", "train", "eval"],
        [[f"`{s['source']}`", s["schema"], s["read"], s["kept"],
          ", ".join(f"{n} {reason}" for reason, n in s["dropped"].items()) or "-", s["train"], s["eval"]]
         for s in run_card["data"]]) + [""]

    lines += ["## Evaluation", ""]
    if eval_report is None:
        lines += ["No evaluation report (`eval_report.json`) was found next to the adapter.", ""]
    else:
        lines += ["Base model vs this model on held-out evaluation sets, with 95% confidence intervals.", ""]
        lines += _table(["task", "metric", "n", "base", "adapter", "difference"], [
            [task, r["metric"], r["n"], _value(r["base"], r.get("base_ci")), _value(r["adapter"], r.get("adapter_ci")),
             f"{r['adapter'] - r['base']:+.3f}" + (f" [{r['delta_ci'][0]:+.3f}, {r['delta_ci'][1]:+.3f}]"
                                                    if r.get("delta_ci") else "")]
            for task, r in eval_report["tasks"].items()]) + [""]

    lines += ["## Use", "", "```python"]
    if kind == "adapter":
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig", ""]
        if model["load_in_4bit"]:
            lines += ["quant = BitsAndBytesConfig(  # as in training",
                      f"    load_in_4bit=True, bnb_4bit_quant_type=\"{model['bnb_4bit_quant_type']}\", "
                      f"bnb_4bit_use_double_quant={model['use_bnb_nested_quant']}, "
                      f"bnb_4bit_compute_dtype=\"{model['dtype']}\")"]
        elif model["load_in_8bit"]:
            lines += ["quant = BitsAndBytesConfig(load_in_8bit=True)  # as in training"]
        else:
            lines += ["quant = None  # trained on the unquantised base"]
        lines += [f"base = AutoModelForCausalLM.from_pretrained(\"{base}\", quantization_config=quant, "
                  f"dtype=\"{model['dtype']}\")",
                  f"model = PeftModel.from_pretrained(base, \"{name}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = AutoModelForCausalLM.from_pretrained(\"{name}\", dtype=\"auto\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")"]
    system = [{"role": "system", "content": run_card["system_prompt"]}] if run_card.get("system_prompt") else []
    messages = [*system, {"role": "user", "content": "Your question"}]
    end_of_turn = end_of_turn_token(load_tokenizer(adapter.path))
    lines += ["", f"messages = {json.dumps(messages, ensure_ascii=False)}",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True).to(model.device)",
              f"# the model ends its turn with {end_of_turn}, which need not be the tokenizer's EOS: stop there",
              "output = model.generate(**inputs, max_new_tokens=256, "
              f"eos_token_id=tokenizer.convert_tokens_to_ids({json.dumps(end_of_turn)}))",
              "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
    lines += ["```", "", "Or chat with it from a lora-recipes clone: `python recipes/chat.py "
              f"{'--adapter' if kind == 'adapter' else '--model_name_or_path'} {name}`.", ""]
    if run_card.get("system_prompt"):
        lines += [f"It was trained with this system prompt: \"{run_card['system_prompt']}\"", ""]

    lines += ["## Intended use and limitations", "", LIMITATIONS, ""]
    return "\n".join(lines)


def check_hub_ready() -> None:
    """Fail in one line, before any work, when a push cannot happen: offline, or no token."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise RecipeError("--push_to_hub: HF_HUB_OFFLINE is set, so the Hub cannot be reached; add --dry_run to "
                          "write and show the model card without pushing")
    if get_token() is None:
        raise RecipeError("--push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN); add "
                          "--dry_run to write and show the model card without pushing")


def push(folder: Path, files: list[str], card: str, repo_id: str, private: bool) -> str:
    """Upload `files` of `folder` and the model card as README.md in one commit; returns the repo URL."""
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(Path(folder) / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(url.repo_id, operations=operations, commit_message="Upload from lora-recipes")
    except (httpx.HTTPError, OSError) as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"--push_to_hub {repo_id}: the upload failed ({problem[:200]})") from None
    return str(url)
