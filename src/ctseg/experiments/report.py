"""Grid report: a Table-1-style table (Markdown + CSV), a Figure-3-style curve, per-class bars,
confusion matrices, and the protocol, hardware, commit and wall time, all computed from run folders.

Inputs are run folders below one directory: any folder with a fit ``metrics.json`` (written by
``ctseg fit``); the runner's ``cell.json`` beside it names the model row, the CT setting and the seed
(without it they are read from ``metrics.json``: model name, CT loss or ``baseline``, the config's
``seed_everything``). Folders whose ``cell.json`` says the cell is not finished are listed as missing,
not averaged.

Per run, the *best epoch* is the epoch with the highest validation mIoU (first on ties); its mIoU,
mF1, OA, per-class IoU and confusion matrix are the run's numbers (the paper reported the maximum
validation mIoU; we take the per-class values from the same epoch). Per row (model × setting): mean
and sample std over seeds; the difference to the same model's baseline row with Welch's t-test
(:mod:`ctseg.experiments.stats`). Test-split numbers, when present, come from the checkpoint chosen on
validation and are reported in their own table.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctseg.engine.report import best_epoch
from ctseg.errors import DataError
from ctseg.experiments.stats import Summary, Welch, fmt, fmt_mean_std, fmt_p, holm, welch
from ctseg.utils.io import atomic_open, atomic_write_json, atomic_write_text

BASELINE_NAMES = ("baseline", "none", "no-ct")


@dataclass
class RunResult:
    """The numbers of one run folder (best validation epoch, and the test evaluation if any)."""

    path: Path
    model: str
    setting: str
    seed: int | None
    best_epoch: int
    epochs: int
    val: dict[str, Any]
    curve: list[tuple[int, float]]
    protocol_summary: str
    hardware: dict[str, Any]
    seconds: float | None
    record: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] | None = None


@dataclass
class Row:
    """One table row: a model with one CT setting, over its seeds."""

    model: str
    setting: str
    runs: list[RunResult]
    is_baseline: bool = False
    welch: Welch | None = None
    p_holm: float | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read run metrics ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(path, "run metrics must be a JSON object")
    return data


def _identity(metrics: dict[str, Any], record: dict[str, Any]) -> tuple[str, str, int | None]:
    if record.get("model") and record.get("setting"):
        return str(record["model"]), str(record["setting"]), record.get("seed")
    model = metrics.get("model") or {}
    ct = model.get("ct") or None
    setting = "baseline" if not ct else str(ct.get("loss", "ct"))
    seed = (metrics.get("config") or {}).get("seed_everything")
    if seed is None:
        seed = ((metrics.get("config") or {}).get("data") or {}).get("seed")
    return str(model.get("name", "model")), setting, seed


def load_run(run_dir: Path) -> RunResult:
    """The numbers of one finished run folder."""
    path = run_dir / "metrics.json"
    metrics = _read_json(path)
    if metrics.get("stage", "fit") != "fit":
        raise DataError(path, f"not a fit report (stage {metrics.get('stage')!r})")
    history = metrics.get("history") or []
    best = best_epoch(history)
    if best is None:
        raise DataError(path, "no epoch with a validation mIoU in its history")
    record_path = run_dir / "cell.json"
    record = _read_json(record_path) if record_path.is_file() else {}
    model, setting, seed = _identity(metrics, record)
    curve = [
        (int(r["epoch"]), float(r["val"]["mIoU"]))
        for r in history
        if (r.get("val") or {}).get("mIoU") is not None
    ]
    test = None
    for cand in (run_dir / "test" / "test_metrics.json", run_dir / "test_metrics.json"):
        if cand.is_file():
            test = _read_json(cand)
            break
    return RunResult(
        path=run_dir,
        model=model,
        setting=setting,
        seed=seed,
        best_epoch=int(best["epoch"]),
        epochs=len(history),
        val=best["val"],
        curve=curve,
        protocol_summary=str(metrics.get("protocol_summary") or metrics.get("protocol") or "unknown"),
        hardware=metrics.get("hardware") or {},
        seconds=metrics.get("seconds"),
        record=record,
        test=test,
    )


def collect_runs(root: Path) -> tuple[list[RunResult], list[str]]:
    """Finished runs below ``root`` and the notes about folders that were left out."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "no such experiment folder")
    runs, notes = [], []
    seen: set[Path] = set()
    for path in sorted(root.rglob("metrics.json")) + sorted(root.rglob("cell.json")):
        run_dir = path.parent
        if run_dir in seen or (run_dir.name == "test" and (run_dir.parent / "metrics.json").is_file()):
            continue
        seen.add(run_dir)
        rel = run_dir.relative_to(root)
        record = _read_json(run_dir / "cell.json") if (run_dir / "cell.json").is_file() else {}
        if record and record.get("status") != "finished":
            notes.append(f"`{rel}`: not finished (status {record.get('status')}), left out")
            continue
        if not (run_dir / "metrics.json").is_file():
            notes.append(f"`{rel}`: no metrics.json, left out")
            continue
        try:
            runs.append(load_run(run_dir))
        except DataError as exc:
            notes.append(f"`{rel}`: {exc.problem}, left out")
    return runs, notes


def _order(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + sorted(v for v in present if v not in preferred)


def build_rows(
    runs: Sequence[RunResult], baseline: str | None, grid: dict[str, Any] | None = None
) -> list[Row]:
    """Rows in grid order, each compared with its model's baseline row (Welch on best val mIoU)."""
    grid = grid or {}
    models = _order([r.model for r in runs], grid.get("models", []))
    settings = _order([r.setting for r in runs], grid.get("settings", []))
    if baseline is None:
        baseline = next((s for s in settings if s in BASELINE_NAMES), None)
    rows = []
    for m in models:
        for s in settings:
            rs = sorted(
                (r for r in runs if r.model == m and r.setting == s), key=lambda r: (r.seed is None, r.seed)
            )
            if rs:
                rows.append(Row(m, s, rs, is_baseline=s == baseline))
    for row in rows:
        base = next((b for b in rows if b.model == row.model and b.is_baseline), None)
        if base is not None and not row.is_baseline:
            row.welch = welch([r.val.get("mIoU") for r in row.runs], [r.val.get("mIoU") for r in base.runs])
    adjusted = holm([None if r.welch is None else r.welch.p for r in rows])
    for row, p in zip(rows, adjusted):
        row.p_holm = p
    return rows


def _classes(runs: Sequence[RunResult], key: str = "val") -> list[str]:
    out: list[str] = []
    for r in runs:
        scores = r.val if key == "val" else (r.test or {}).get("scores") or {}
        for c in scores.get("per_class") or {}:
            if c not in out:
                out.append(c)
    return out


def _scores(run: RunResult, split: str) -> dict[str, Any] | None:
    return run.val if split == "val" else (run.test or {}).get("scores")


def row_stats(row: Row, classes: Sequence[str], split: str = "val") -> dict[str, Summary]:
    """Summaries over the row's seeds: mIoU, mF1, OA and ``IoU/<class>`` (best val epoch's values)."""
    scores = [s for s in (_scores(r, split) for r in row.runs) if s]
    out = {k: Summary.of(s.get(k) for s in scores) for k in ("mIoU", "mF1", "OA")}
    for c in classes:
        out[f"IoU/{c}"] = Summary.of(((s.get("per_class") or {}).get(c) or {}).get("IoU") for s in scores)
    return out


def _label(name: str, labels: dict[str, str]) -> str:
    return labels.get(name, name)


def table_markdown(
    rows: Sequence[Row], classes: Sequence[str], labels: dict[str, str], split: str = "val"
) -> str:
    head = ["model", "CT setting", "n", "mIoU (mean ± std)", *classes, "mF1", "OA"]
    if split == "val":
        head += ["Δ mIoU vs baseline", "95% CI of Δ", "Welch t", "df", "p", "p (Holm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        st = row_stats(row, classes, split)
        if st["mIoU"].n == 0:
            continue
        cells = [
            _label(row.model, labels),
            _label(row.setting, labels) + (" (baseline)" if row.is_baseline else ""),
            str(st["mIoU"].n),
            fmt_mean_std(st["mIoU"]),
            *(fmt(st[f"IoU/{c}"].mean) for c in classes),
            fmt_mean_std(st["mF1"]),
            fmt_mean_std(st["OA"]),
        ]
        if split == "val":
            w = row.welch
            if row.is_baseline:
                cells += ["—"] * 6
            elif w is None:
                cells += ["n/a"] * 6
            else:
                cells += [
                    fmt(w.diff, signed=True),
                    f"[{fmt(w.ci_low, signed=True)}, {fmt(w.ci_high, signed=True)}]",
                    fmt(w.t, 2, signed=True),
                    fmt(w.df, 1),
                    fmt_p(w.p),
                    fmt_p(row.p_holm),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_csv(rows: Sequence[Row], classes: Sequence[str], split: str = "val") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = ["mIoU", *(f"IoU/{c}" for c in classes), "mF1", "OA"]
    head = ["model", "setting", "baseline", "n", "seeds", "best_epochs"]
    for k in keys:
        head += [f"{k.replace('IoU/', 'iou_')}_mean", f"{k.replace('IoU/', 'iou_')}_std"]
    if split == "val":
        head += ["delta_miou", "ci95_low", "ci95_high", "welch_t", "welch_df", "p", "p_holm"]
    w.writerow(head)
    for row in rows:
        st = row_stats(row, classes, split)
        if st["mIoU"].n == 0:
            continue
        line: list[Any] = [
            row.model,
            row.setting,
            int(row.is_baseline),
            st["mIoU"].n,
            " ".join(str(r.seed) for r in row.runs),
            " ".join(str(r.best_epoch) for r in row.runs),
        ]
        for k in keys:
            line += [_num(st[k].mean), _num(st[k].std)]
        if split == "val":
            wt = row.welch
            line += (
                [""] * 7
                if wt is None
                else [
                    _num(wt.diff),
                    _num(wt.ci_low),
                    _num(wt.ci_high),
                    _num(wt.t),
                    _num(wt.df),
                    _num(wt.p),
                    _num(row.p_holm),
                ]
            )
        w.writerow(line)
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


# ----------------------------------------------------------------------------------- figures


def _colors(settings: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(settings)}


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    return path


def plot_curves(rows: Sequence[Row], labels: dict[str, str], path: Path) -> Path:
    """Figure-3 style: validation mIoU per epoch; mean line and ±1 sample-std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    colors = _colors(list(dict.fromkeys(r.setting for r in rows)))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], models):
        for row in (r for r in rows if r.model == m):
            epochs = sorted({e for run in row.runs for e, _ in run.curve})
            xs, mean, lo, hi = [], [], [], []
            for e in epochs:
                s = Summary.of(dict(run.curve).get(e) for run in row.runs)
                if s.mean is None:
                    continue
                xs.append(e + 1)
                mean.append(s.mean)
                sd = s.std or 0.0
                lo.append(s.mean - sd)
                hi.append(s.mean + sd)
            n = len(row.runs)
            ax.plot(xs, mean, "-", color=colors[row.setting], label=f"{_label(row.setting, labels)} (n={n})")
            if n > 1:
                ax.fill_between(xs, lo, hi, color=colors[row.setting], alpha=0.2, linewidth=0)
        ax.set_title(_label(m, labels))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mIoU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("validation mIoU per epoch: mean over seeds, band = ±1 sample std", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_class(rows: Sequence[Row], classes: Sequence[str], labels: dict[str, str], path: Path) -> Path:
    """Per-class IoU at each run's best validation epoch: bar = mean, whisker = sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    settings = list(dict.fromkeys(r.setting for r in rows))
    colors = _colors(settings)
    width_in = min(14.0, max(6.0, 0.3 * len(classes) * max(1, len(settings)) + 2.0))
    fig, axes = plt.subplots(len(models), 1, figsize=(width_in, 3.8 * len(models)), dpi=100, squeeze=False)
    width = 0.8 / max(1, len(settings))
    for ax, m in zip(axes[:, 0], models):
        mrows = [r for r in rows if r.model == m]
        for row in mrows:
            st = row_stats(row, classes)
            means = [st[f"IoU/{c}"].mean or 0.0 for c in classes]
            errs = [st[f"IoU/{c}"].std or 0.0 for c in classes]
            xs = [
                i + (settings.index(row.setting) - (len(settings) - 1) / 2) * width
                for i in range(len(classes))
            ]
            ax.bar(
                xs,
                means,
                width,
                yerr=errs,
                capsize=2,
                color=colors[row.setting],
                label=_label(row.setting, labels),
            )
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels(classes, rotation=20, fontsize=8)
        ax.set_ylabel("IoU (best val epoch)")
        ax.set_ylim(0, 1)
        ax.set_title(_label(m, labels))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def summed_confusion(row: Row, split: str = "val") -> list[list[int]] | None:
    """The row's confusion matrices (best validation epoch of each seed) summed over seeds."""
    total: list[list[int]] | None = None
    for run in row.runs:
        scores = _scores(run, split) or {}
        cm = scores.get("confusion_matrix")
        if cm is None:
            continue
        if total is None:
            total = [[0] * len(cm) for _ in cm]
        if len(cm) != len(total):
            raise DataError(run.path / "metrics.json", "confusion matrix size differs from the other runs")
        for i, r in enumerate(cm):
            for j, v in enumerate(r):
                total[i][j] += int(v)
    return total


def plot_confusions(
    rows: Sequence[Row], classes: Sequence[str], labels: dict[str, str], path: Path
) -> Path | None:
    """Row-normalised confusion matrices (recall per ground-truth class), summed over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [(row, summed_confusion(row)) for row in rows]
    mats = [(row, cm) for row, cm in mats if cm is not None]
    if not mats:
        return None
    ncol = min(3, len(mats))
    nrow = math.ceil(len(mats) / ncol)
    k = len(mats[0][1])
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.4 * nrow), dpi=100, squeeze=False)
    for ax in axes.flat[len(mats) :]:
        ax.axis("off")
    names = list(classes) if len(classes) == k else [str(i) for i in range(k)]
    for ax, (row, cm) in zip(axes.flat, mats):
        norm = [[v / max(1, sum(r)) for v in r] for r in cm]
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{100 * norm[i][j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i][j] > 0.5 else "black")  # fmt: skip
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=6)
        ax.set_yticklabels(names, fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("ground truth", fontsize=7)
        ax.set_title(
            f"{_label(row.model, labels)} / {_label(row.setting, labels)} (n={len(row.runs)})", fontsize=8
        )
    fig.suptitle(
        "confusion matrices at the best validation epoch, summed over seeds, % of each true class", fontsize=8
    )
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------- report


@dataclass
class GridReport:
    """What :func:`write_report` wrote and the rows it computed."""

    rows: list[Row]
    classes: list[str]
    paths: dict[str, Path]
    notes: list[str]


def _hardware_line(hw: dict[str, Any]) -> str:
    gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
    return (
        f"{hw.get('cpu')} ({hw.get('cpu_count')} CPUs, {hw.get('torch_threads')} torch threads), {gpus}; "
        f"{hw.get('platform')}; torch {hw.get('torch')}, lightning {hw.get('lightning')}, precision {hw.get('precision')}"
    )


def write_report(
    root: str | Path,
    out: str | Path | None = None,
    *,
    baseline: str | None = None,
    title: str | None = None,
    image_prefix: str = "",
) -> GridReport:
    """Write ``report.md``, ``table.csv`` (+ ``test_table.csv``), ``curves.png``, ``per_class.png``,
    ``confusion.png`` and ``report.json`` for the runs below ``root`` into ``out`` (default ``root/report``)."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    runs, notes = collect_runs(root)
    if not runs:
        raise DataError(root, "no finished run (no fit metrics.json) below this folder")
    grid_path = root / "grid.json"
    grid = _read_json(grid_path) if grid_path.is_file() else {}
    baseline = baseline or grid.get("baseline")
    labels = dict(grid.get("labels") or {})
    protocols = sorted({r.protocol_summary for r in runs})
    if len(protocols) > 1:
        raise DataError(root, f"runs of different protocols cannot share a table: {protocols}")
    rows = build_rows(runs, baseline, grid)
    classes = _classes(runs)
    mean_classes = list(runs[0].val.get("mean_classes") or [])
    for cid in grid.get("cells", []):
        if not any(str(r.path.relative_to(root)) == cid for r in runs):
            note = f"`{cid}`: not finished, left out"
            if not any(n.startswith(f"`{cid}`") for n in notes):
                notes.append(note)

    paths = {"markdown": out / "report.md", "csv": out / "table.csv", "json": out / "report.json"}
    atomic_write_text(paths["csv"], table_csv(rows, classes))
    paths["curves"] = plot_curves(rows, labels, out / "curves.png")
    paths["per_class"] = plot_per_class(rows, classes, labels, out / "per_class.png")
    cm = plot_confusions(rows, classes, labels, out / "confusion.png")
    if cm is not None:
        paths["confusion"] = cm
    test_rows = [r for r in rows if any(run.test for run in r.runs)]
    if test_rows:
        paths["test_csv"] = out / "test_table.csv"
        atomic_write_text(paths["test_csv"], table_csv(test_rows, _classes(runs, "test"), split="test"))

    name = title or grid.get("name") or root.name
    md = [f"# Experiment report: {name}", ""]
    if grid.get("description"):
        md += [grid["description"], ""]
    md += [
        f"- **protocol**: {protocols[0]}",
        f"- **runs**: {len(runs)} finished run(s) in {len(rows)} row(s) below `{root}`",
        "- **per run**: the epoch with the highest validation mIoU (first on ties); mIoU, per-class IoU, mF1 and OA "
        "all from that epoch. mIoU / mF1 = mean over "
        + (
            f"{len(mean_classes)} classes ({', '.join(mean_classes)})"
            if mean_classes
            else "the protocol's classes"
        )
        + "; OA over all classes; one confusion matrix over all validation pixels, ignore pixels dropped.",
        "- **per row**: mean ± sample std (ddof = 1) over seeds; `n/a` where n < 2.",
        f"- **vs baseline** (`{baseline or 'none'}` of the same model): Δ = mean difference of best val mIoU; Welch's "
        "t = Δ / sqrt(s1²/n1 + s2²/n2), Welch–Satterthwaite df, two-sided p, 95% CI of Δ; `p (Holm)` adjusts for "
        "the number of comparisons in this table. With n = 3 per row only large, consistent differences reach "
        "p < 0.05; a p above it means *not separated at this n*, not *no effect*.",
    ]
    hws: dict[str, int] = {}
    for r in runs:
        line = _hardware_line(r.hardware)
        hws[line] = hws.get(line, 0) + 1
    md += [f"- **hardware**: {line} ({n} run(s))" for line, n in hws.items()]
    walls = [float(r.record["wall_seconds"]) for r in runs if r.record.get("wall_seconds") is not None]
    if walls:
        md.append(
            f"- **cell time**: {sum(walls) / 3600:.2f} h summed over {len(walls)} cell(s) "
            f"(per cell {min(walls) / 60:.1f}–{max(walls) / 60:.1f} min, incl. start-up and evaluation)"
        )
    span = _span(runs)
    if span is not None:
        md.append(f"- **elapsed**: {span / 60:.1f} min from the first cell's start to the last cell's end")
    commits = sorted({str(r.record.get("commit")) for r in runs if r.record.get("commit")})
    if commits:
        md.append(f"- **commit**: {', '.join(commits)}")
    commands = sorted({str(r.record.get("command")) for r in runs if r.record.get("command")})
    if commands:
        md.append("- **command**: " + "; ".join(f"`{c}`" for c in commands))
    md += ["", "## Validation (best epoch per run)", "", table_markdown(rows, classes, labels), ""]
    md.append(f"Per-class columns: IoU means; standard deviations in [`table.csv`]({image_prefix}table.csv).")
    if test_rows:
        test_classes = _classes(runs, "test")
        md += [
            "",
            "## Test split (checkpoint selected on validation only)",
            "",
            "Each run's checkpoint of its best *validation* epoch, evaluated once on the test split (`ctseg test`, "
            "same metric protocol). The test split played no part in choosing epochs or settings.",
            "",
            table_markdown(test_rows, test_classes, labels, split="test"),
        ]
    md += [
        "",
        "## Figures",
        "",
        f"![validation mIoU per epoch]({image_prefix}curves.png)",
        "",
        f"![per-class IoU]({image_prefix}per_class.png)",
    ]
    if cm is not None:
        md += ["", f"![confusion matrices]({image_prefix}confusion.png)"]
    md += [
        "",
        "## Runs",
        "",
        "| row | seed | best epoch / epochs | best val mIoU | wall time | folder |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row.runs:
            wall = r.record.get("wall_seconds")
            md.append(
                f"| {row.model} / {row.setting} | {r.seed} | {r.best_epoch + 1} / {r.epochs} | {fmt(r.val.get('mIoU'))} | "
                f"{'n/a' if wall is None else f'{float(wall) / 60:.1f} min'} | `{r.path.relative_to(root)}` |"
            )
    if notes:
        md += ["", "## Left out", ""] + [f"- {n}" for n in notes]
    atomic_write_text(paths["markdown"], "\n".join(md) + "\n")
    atomic_write_json(
        paths["json"],
        {
            "protocol": protocols[0],
            "baseline": baseline,
            "classes": classes,
            "rows": [_row_json(r, classes) for r in rows],
            "notes": notes,
        },
    )
    return GridReport(rows, classes, paths, notes)


def _span(runs: Sequence[RunResult]) -> float | None:
    """Seconds from the earliest recorded cell start to the latest cell end (cells may run in parallel)."""
    from datetime import datetime

    try:
        starts = [datetime.fromisoformat(r.record["started"]) for r in runs if r.record.get("started")]
        ends = [datetime.fromisoformat(r.record["finished"]) for r in runs if r.record.get("finished")]
    except (TypeError, ValueError):
        return None
    if not starts or not ends:
        return None
    return (max(ends) - min(starts)).total_seconds()


def _row_json(row: Row, classes: Sequence[str]) -> dict[str, Any]:
    st = row_stats(row, classes)
    out: dict[str, Any] = {
        "model": row.model,
        "setting": row.setting,
        "baseline": row.is_baseline,
        "runs": [str(r.path) for r in row.runs],
        "stats": {k: {"n": s.n, "mean": s.mean, "std": s.std} for k, s in st.items()},
    }
    if row.welch is not None:
        out["welch"] = {**row.welch.__dict__, "p_holm": row.p_holm}
    if any(r.test for r in row.runs):
        tst = row_stats(row, _classes(row.runs, "test"), "test")
        out["test_stats"] = {k: {"n": s.n, "mean": s.mean, "std": s.std} for k, s in tst.items()}
    return out
