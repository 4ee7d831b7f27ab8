"""Did the fine-tuning help? The base model and the adapter side by side, per task, with 95% bootstrap intervals.

The domain's standard evaluation sets (medical: MedQA test, MedMCQA validation, PubMedQA pqa_labeled; needs the Hub):
    python recipes/evaluate.py --adapter outputs/medical-qwen2.5-1.5b-qlora --output_dir outputs/medical-eval

Your own data, or a Hub dataset's named split (ID@SPLIT), a quick look at 200 examples per task:
    python recipes/evaluate.py --adapter outputs/medical-qwen2.5-1.5b-qlora \
        --dataset_name my_cases.jsonl openlifescienceai/medmcqa@validation --limit 200 --output_dir outputs/eval-quick

A domain without standard sets (finance, or a new one from recipes/new_domain.py): the held-out split of the
adapter's own training data, rebuilt from run_card.json as the run split it (never trained on):
    python recipes/evaluate.py --adapter outputs/finance-smoke --output_dir outputs/finance-smoke-eval

Offline demo after the smoke training run, on its own training samples (memorisation, not generalisation):
    python recipes/evaluate.py --adapter outputs/medical-smoke --output_dir outputs/medical-smoke-eval --limit 40 \
        --dataset_name data/samples/medical/medqa.jsonl data/samples/medical/pubmedqa.jsonl \
        data/samples/medical/flashcards.jsonl

The base model is the adapter's (adapter_config.json), loaded as it was trained (run_card.json: 4-bit NF4 for the
recipes) and only once: the adapter is switched off for the base numbers. Writes OUT/eval_report.json, .md, .png.
How each task is scored: lora_recipes/evaluation.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from lora_recipes.errors import RecipeError, exit_on_recipe_error  # noqa: E402
from lora_recipes.evaluation import (  # noqa: E402
    EvalArguments,
    compare,
    eval_sets,
    held_out_tasks,
    load_domain,
    load_for_evaluation,
    named_tasks,
    open_adapter,
    report_meta,
    standard_tasks,
    write_report,
)
from lora_recipes.model import describe_quantization  # noqa: E402


@exit_on_recipe_error
def main(args: EvalArguments):
    args.check()

    # 1. The adapter and what its run card says about its training: the domain, the data, the sequence length
    adapter, card = open_adapter(args.adapter)
    domain = load_domain(args.domain, card)
    trained = card["config"] if card else {"data": {"dataset_name": []}, "training": {"max_length": None}}
    args.max_length = args.max_length or trained["training"]["max_length"] or 2048

    # 2. The tasks: the datasets named, or the domain's standard sets (each skipped, said why, when out of reach), or
    #    for a domain without any, the held-out split of the adapter's training data
    if args.dataset_name:
        tasks, skipped = named_tasks(args.dataset_name, domain, args.limit, trained["data"]["dataset_name"]), []
    elif eval_sets(domain):
        tasks, skipped = standard_tasks(domain, args.limit)
    else:
        tasks, skipped = held_out_tasks(adapter, card, domain, args.limit), []
    if not tasks:
        raise RecipeError("nothing to evaluate: no standard set could be loaded; pass --dataset_name FILE or ID")

    # 3. The base model, loaded once and as it was trained, with the adapter on top
    model, tokenizer, model_args = load_for_evaluation(adapter, card, args.model_name_or_path)

    # 4. Every task with the adapter off (base) and on, in bounded batches
    results = compare(model, tokenizer, tasks, args)

    # 5. The report: eval_report.json (numbers), eval_report.md (table + examples), eval_report.png (plot)
    meta = report_meta(adapter, model_args.model_name_or_path, describe_quantization(model_args), args, skipped)
    path = write_report(results, Path(args.output_dir), meta)
    print(f"Report: {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(*HfArgumentParser(EvalArguments).parse_args_into_dataclasses())
