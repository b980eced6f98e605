"""The comparison figure: fine-tuned PSNR vs GFLOPs per variant, and the GPU hours of dynamic vs
separate pre-training (from the runs ``dyntrain.analysis.compare.collect_runs`` found)."""
from __future__ import annotations

from pathlib import Path

from dyntrain.analysis.runs import PretrainRun, ResultRun, separate_vs_dynamic
from dyntrain.tracking.savings import EQUAL_ITERATIONS, saved_text


def plot(pretrain: list[PretrainRun], results: list[ResultRun], path: str | Path) -> Path:
    """Two panels: average PSNR vs GFLOPs per variant; GPU hours of dynamic vs separate pre-training."""
    # lazy: matplotlib is optional: plots only
    import matplotlib
    matplotlib.use("Agg")
    # lazy: matplotlib is optional: plots only
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        pts = sorted((r.gflops[v], r.results[v]["average"]["psnr"], v) for v in r.results
                     if v in r.gflops and "psnr" in r.results[v].get("average", {}))
        if not pts:
            continue
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r.name)
        for x, y, v in pts:
            ax1.annotate(f"DyNet-{v}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set_xlabel("GFLOPs at 224x224")
    ax1.set_ylabel("average PSNR (dB)")
    ax1.set_title("Fine-tuned PSNR vs compute per variant")
    if ax1.lines:
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no evaluated runs", ha="center", va="center", transform=ax1.transAxes)

    labels, values, colors = [], [], []
    for r in pretrain:
        if r.metrics.get("gpu_hours") is None:
            continue
        labels.append(f"{r.name}\n({r.mode})")
        values.append(r.metrics["gpu_hours"])
        colors.append("tab:green" if r.mode == "dynamic" else "tab:gray")
        if r.mode == "dynamic" and r.metrics.get("gpu_hours_separate"):
            labels.append(f"{r.name}\nS+L separately\n(estimated)")
            values.append(r.metrics["gpu_hours_separate"])
            colors.append("tab:orange")
    saving = separate_vs_dynamic(pretrain)
    if saving:
        labels.append("fixed S + fixed L\n(measured, same steps)")
        values.append(saving["separate_gpu_hours"])
        colors.append("tab:red")
    if values:
        ax2.bar(range(len(values)), values, color=colors)
        ax2.set_xticks(range(len(values)))
        ax2.set_xticklabels(labels, fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no pre-training runs", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("GPU hours")
    title = "Pre-training: dynamic vs separate"
    dyn = [r for r in pretrain if r.mode == "dynamic" and r.metrics.get("gpu_hours_saved_frac") is not None]
    if saving:
        title += f" ({saved_text(saving['saved_frac'], EQUAL_ITERATIONS, 0)})"
    elif dyn:
        title += f" ({saved_text(dyn[-1].metrics['gpu_hours_saved_frac'], EQUAL_ITERATIONS, 0)}, estimated)"
    ax2.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_iso(dynamic: dict, separate: dict, path: str | Path, result: dict | None = None,
             xlabel: str = "GPU hours (validation excluded)", label: str = "dynamic") -> Path:
    """Val PSNR vs cost (GPU hours, or ``xlabel``), one panel per variant: the dynamic run (or any
    recipe's, named ``label``) against its separate run."""
    # lazy: matplotlib is optional: plots only
    import matplotlib
    matplotlib.use("Agg")
    # lazy: matplotlib is optional: plots only
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    variants = sorted(dynamic)
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4.2), squeeze=False)
    for ax, v in zip(axes[0], variants):
        for curve, name, color in ((dynamic[v], label, "tab:green"),
                                   (separate.get(v, []), f"separate ({v} only)", "tab:gray")):
            pts = sorted(curve)
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=name, color=color)
        if result is not None:
            ax.axhline(result["target_psnr"][v], ls=":", color="tab:green", lw=1)
            ax.axvline(result["gh_separate_to_match"][v], ls=":", color="tab:gray", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val PSNR (dB)")
        ax.set_title(f"DyNet-{v}")
        ax.legend(fontsize=8)
    if result is not None and result.get("iso_quality_saving") is not None:
        fig.suptitle(f"iso_quality_saving = {result['iso_quality_saving']:.3f} at equal validation quality"
                     + (" (lower bound)" if result["iso_quality_saving_is_bound"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
