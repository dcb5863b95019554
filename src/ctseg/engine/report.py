"""Run reports: ``metrics.json`` (machine-readable) and ``report.md`` (per-class table, protocol, config,
time, hardware, CT statistics), plus a training-curve PNG.

Every number in a report names its protocol (``Protocol.summary()``) and its evaluation split, and the
best-epoch convention: the summary row is the epoch with the highest validation mIoU, and the per-class
table is taken from that same epoch (the paper mixed epochs; we do not).
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ctseg.utils.io import atomic_open, atomic_write_json, atomic_write_text


def hardware_info() -> dict[str, Any]:
    """What ran the job: host CPU, GPUs, library versions."""
    import lightning

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["gpus"] = []
    return info


def best_epoch(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch record with the highest validation mIoU (first one on ties), or ``None``."""
    best, best_v = None, -math.inf
    for rec in history:
        val = rec.get("val") or {}
        v = val.get("mIoU")
        if v is not None and v > best_v:
            best, best_v = rec, v
    return best


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def per_class_table(scores: dict[str, Any]) -> str:
    """Markdown table of a ``SegmentationScores.to_dict()``: one row per class, then the means."""
    mean_classes = set(scores.get("mean_classes", []))
    lines = ["| class | IoU | F1 | precision | recall | in mean |", "|---|---|---|---|---|---|"]
    for cls, s in scores["per_class"].items():
        lines.append(
            f"| {cls} | {_fmt(s['IoU'])} | {_fmt(s['F1'])} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | "
            f"{'yes' if cls in mean_classes else 'no'} |"
        )
    lines.append(
        f"| **mean ({len(mean_classes)} classes)** | **{_fmt(scores['mIoU'])}** | **{_fmt(scores['mF1'])}** | | | |"
    )
    lines.append(f"| OA (all classes) | {_fmt(scores['OA'])} | | | | |")
    return "\n".join(lines)


def ct_table(history: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the per-epoch CT statistics (epoch means)."""
    rows = [r for r in history if r.get("ct")]
    if not rows:
        return "CT was off in this run."
    keys = ["active", "clipped", "skipped_fraction", "loss_raw"]
    stage_keys = sorted({k for r in rows for k in r["ct"] if k.startswith("stage")})
    cols = [k for k in keys if any(k in r["ct"] for r in rows)] + stage_keys
    lines = ["| epoch | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | " + " | ".join(_fmt(r["ct"].get(k), 3) for k in cols) + " |")
    return "\n".join(lines)


def history_table(history: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| epoch | train loss | val loss | val mIoU | val mF1 | CT active | CT clipped | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in history:
        val = r.get("val") or {}
        ct = r.get("ct") or {}
        lines.append(
            f"| {r['epoch']} | {_fmt(r.get('train_loss'))} | {_fmt(r.get('val_loss'))} | {_fmt(val.get('mIoU'))} | "
            f"{_fmt(val.get('mF1'))} | {_fmt(ct.get('active'), 2)} | {_fmt(ct.get('clipped'), 2)} | "
            f"{_fmt(r.get('seconds'), 1)} |"
        )
    return "\n".join(lines)


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Train loss and validation mIoU per epoch as a PNG; ``None`` when there is nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax1.plot(epochs, [r.get("train_loss") for r in history], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    miou = [(r["epoch"], (r.get("val") or {}).get("mIoU")) for r in history]
    miou = [(e, v) for e, v in miou if v is not None]
    if miou:
        ax2 = ax1.twinx()
        ax2.plot([e for e, _ in miou], [v for _, v in miou], "s-", color="tab:orange", label="val mIoU")
        ax2.set_ylabel("val mIoU", color="tab:orange")
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    return path


def write_report(
    run_dir: str | Path,
    *,
    stage: str,
    protocol: dict[str, Any],
    protocol_summary: str,
    model: dict[str, Any],
    scores: dict[str, Any] | None,
    history: Sequence[dict[str, Any]] = (),
    config: dict[str, Any] | None = None,
    config_text: str | None = None,
    hardware: dict[str, Any] | None = None,
    seconds: float | None = None,
    split: str = "val",
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``{prefix}metrics.json`` and ``{prefix}report.md`` (prefix ``""`` for fit, ``"test_"`` / ``"validate_"``).

    For ``stage="fit"`` the headline scores are the best epoch's (by val mIoU) when ``scores`` is None.
    """
    run_dir = Path(run_dir)
    prefix = "" if stage == "fit" else f"{stage}_"
    best = best_epoch(history) if stage == "fit" else None
    if scores is None and best is not None:
        scores = best["val"]
    hardware = hardware or hardware_info()
    payload: dict[str, Any] = {
        "stage": stage,
        "split": split,
        "protocol": protocol.get("name"),
        "protocol_summary": protocol_summary,
        "metric_protocol": "dataset-level confusion matrix over all evaluated pixels, ignore index dropped; "
        "mIoU/mF1 = NaN-mean over the protocol's mean classes; OA over all classes",
        "model": model,
        "scores": scores,
        "best_epoch": None if best is None else best["epoch"],
        "epochs": len(history),
        "seconds": seconds,
        "hardware": hardware,
        "config": config,
        "history": list(history),
    }
    if extra:
        payload.update(extra)
    paths = {"metrics": run_dir / f"{prefix}metrics.json", "report": run_dir / f"{prefix}report.md"}
    atomic_write_json(paths["metrics"], _json_safe(payload))

    md = [
        f"# ctseg {stage} report: {model.get('name')} {'with CT ' + str(model.get('ct', {}).get('loss')) if model.get('ct') else '(no CT)'}",
        "",
    ]
    md.append(f"- **protocol**: {protocol_summary}")
    md.append(f"- **split evaluated**: {split}")
    if best is not None:
        md.append(
            f"- **best epoch** (highest {split} mIoU): {best['epoch']} of {len(history)}; per-class table from that epoch"
        )
    if seconds is not None:
        md.append(f"- **time**: {seconds:.1f} s")
    md.append(
        f"- **hardware**: {hardware.get('cpu')} ({hardware.get('cpu_count')} CPUs), "
        f"GPUs: {', '.join(hardware.get('gpus') or []) or 'none'}; torch {hardware.get('torch')}, "
        f"lightning {hardware.get('lightning')}"
    )
    md.append("")
    md.append("## Per-class scores")
    md.append("")
    md.append(per_class_table(scores) if scores else "No evaluation ran.")
    md.append("")
    md.append("Metric protocol: " + payload["metric_protocol"] + ".")
    if history:
        md += [
            "",
            "## Epochs",
            "",
            history_table(history),
            "",
            "## CT statistics (epoch means)",
            "",
            ct_table(history),
        ]
        if any("stage" in k for r in history for k in (r.get("ct") or {})):
            md.append("")
            md.append(
                "`stage{s}/positives|negatives|pairs`: mean per step; `active`: fraction of steps with a CT "
                "term; `clipped`: fraction of steps where the clip cut the gradient."
            )
        png = plot_curves(history, run_dir / f"{prefix}curves.png", title=str(model.get("name")))
        if png is not None:
            paths["curves"] = png
            md += ["", f"![training curves]({png.name})"]
    if config_text:
        md += ["", "## Config", "", "```yaml", config_text.rstrip(), "```"]
    elif config:
        import yaml

        md += [
            "",
            "## Config",
            "",
            "```yaml",
            yaml.safe_dump(_json_safe(config), sort_keys=False).rstrip(),
            "```",
        ]
    atomic_write_text(paths["report"], "\n".join(md) + "\n")
    return paths


def _json_safe(obj: Any) -> Any:
    """NaN/inf → None, tuples → lists, other objects → str, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _json_safe(obj.item())
    return str(obj)
