"""PNG plots a run leaves next to its adapter: the loss curve and the base-vs-adapter evaluation.

Figures are drawn with matplotlib's object API on the Agg canvas: no display, no global pyplot state.
"""

from pathlib import Path


def plot_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    """Train and eval loss against the optimizer step, from the trainer's log history; None when nothing was logged."""
    from matplotlib.figure import Figure

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        return None
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    for points, label, style in ((train, "train loss", "-"), (evaluation, "eval loss", "o--")):
        if points:
            steps, losses = zip(*points, strict=False)
            axes.plot(steps, losses, style, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (per assistant token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_eval_report(tasks: dict, path: Path) -> Path:
    """Base and adapter side by side per task (the task's headline metric), with 95% bootstrap intervals."""
    from matplotlib.figure import Figure

    names = list(tasks)
    figure = Figure(figsize=(max(5.0, 1.4 * len(names) + 2), 4), layout="constrained")
    axes = figure.subplots()
    width = 0.38
    for offset, model in ((-width / 2, "base"), (width / 2, "adapter")):
        values = [tasks[name][model] for name in names]
        low = [tasks[name][model] - tasks[name][f"{model}_ci"][0] for name in names]
        high = [tasks[name][f"{model}_ci"][1] - tasks[name][model] for name in names]
        axes.bar([i + offset for i in range(len(names))], values, width, yerr=[low, high], capsize=3, label=model)
    axes.set_xticks(range(len(names)), [f"{name}\n{tasks[name]['metric']} (n={tasks[name]['n']})" for name in names],
                    fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score (95% bootstrap interval)")
    axes.set_title("Base model vs adapter")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
    return Path(path)
