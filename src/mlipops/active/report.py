"""``reports/active/``: the campaign's learning curve (hold-out force MAE against oracle calls), a table
of the iterations and ``metrics.json`` (the last iteration's numbers and the totals)."""

from __future__ import annotations

from pathlib import Path

from mlipops.params import Params
from mlipops.report import write_markdown, write_metrics
from mlipops.pipeline import ACTIVE_REPORTS as REPORT_DIR



def learning_curve(summary: dict) -> tuple[list[int], list[float]]:
    """(oracle calls so far, hold-out force MAE) with the seed model at 0 calls."""
    calls, mae = [], []
    if "holdout.force_mae" in summary.get("initial", {}):
        calls.append(0)
        mae.append(summary["initial"]["holdout.force_mae"])
    for h in summary["history"]:
        if "holdout.force_mae" in h:
            calls.append(int(h.get("oracle_calls_total", 0)))
            mae.append(h["holdout.force_mae"])
    return calls, mae


def write_report(summary: dict, p: Params, report_dir: Path = REPORT_DIR) -> dict:
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    report_dir.mkdir(parents=True, exist_ok=True)
    hist = summary["history"]
    last = hist[-1] if hist else {}
    init = summary.get("initial", {})
    metrics = {"iterations": summary["iterations"], "mode": p.active.mode,
               "oracle_calls_total": int(last.get("oracle_calls_total", 0)),
               "labelled_total": sum(h.get("labelled", 0) for h in hist),
               "failed_total": sum(h.get("failed", 0) for h in hist),
               "quarantined_total": sum(h.get("curate.n_quarantined_new", 0) for h in hist),
               "md_steps_total": sum(h.get("md_steps", 0) for h in hist),
               "triggers_total": sum(h.get("triggers", 0) for h in hist)}
    for k in ("holdout.force_mae", "holdout.energy_mae_per_atom", "holdout.phase.liquid.force_mae",
              "holdout.phase.solid.force_mae"):
        if k in init:
            metrics[f"initial.{k}"] = init[k]
        if k in last:
            metrics[f"final.{k}"] = last[k]
    write_metrics(report_dir, metrics)
    calls, mae = learning_curve(summary)
    plots = []
    if calls:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot(calls, mae, "o-", label=f"trigger: {p.active.mode}")
        ax.set_xlabel("oracle calls")
        ax.set_ylabel("hold-out force MAE (eV/Å)")
        ax.set_title("active learning: error on the held-out trajectory")
        ax.legend()
        save_figure(fig, report_dir / "learning_curve.png", dpi=110)
        plots.append("![learning curve](learning_curve.png)")
    cols = ("iteration", "MD steps", "triggers", "oracle calls", "labelled", "failed", "quarantined",
            "hold-out F MAE (eV/Å)", "liquid F MAE", "max σ_proj (eV)", "max σ_F (eV/Å)")
    rows = [("seed model", "", "", 0, "", "", "", _f(init.get("holdout.force_mae")),
             _f(init.get("holdout.phase.liquid.force_mae")), "", "")] if init else []
    for h in hist:
        rows.append((h["iteration"], h.get("md_steps"), h.get("triggers"), h.get("oracle_calls_total"),
                     h.get("labelled"), h.get("failed"), h.get("curate.n_quarantined_new", ""),
                     _f(h.get("holdout.force_mae")), _f(h.get("holdout.phase.liquid.force_mae")),
                     _f(h.get("sigma_projected.max")), _f(h.get("max_sigma_f.max"))))
    write_markdown(report_dir / "summary.md", "Active learning", [
        f"Trigger `{p.active.mode}`; {metrics['iterations']} iteration(s); {metrics['oracle_calls_total']} oracle "
        f"calls, {metrics['labelled_total']} frames labelled ({metrics['failed_total']} failed, "
        f"{metrics['quarantined_total']} quarantined by validation). The model after the last iteration: "
        f"`{summary.get('model')}`; labelled frames in `{p.active.out_dir}`.",
        "Hold-out: the oracle's own MD through " + ", ".join(f"{t:g}" for t in p.active.holdout.temperatures_K)
        + " K (liquid: Lindemann ratio > 0.15), never trained on.",
        *plots,
    ], table=(cols, rows))
    return metrics


def _f(x) -> str:
    return "" if x is None else f"{x:.4g}"
