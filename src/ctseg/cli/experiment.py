"""``ctseg experiment run | list | report``: grids of (model × CT setting × seed) and their reports.

Examples::

    ctseg experiment list configs/experiments/dubai-cpu.yaml               # cells and their status
    ctseg experiment list configs/experiments/dubai-cpu.yaml --commands    # one job line per open cell
    ctseg experiment run configs/experiments/dubai-cpu.yaml                # run / resume everything
    ctseg experiment run configs/experiments/potsdam-paper-table1.yaml --only 'dcswin/cl/*' --device gpu
    ctseg experiment report runs/experiments/dubai-cpu --out docs/results/dubai-cpu

See ``docs/experiments.md``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from ctseg.experiments.grid import load_grid


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid file (YAML), e.g. configs/experiments/dubai-cpu.yaml")
    p.add_argument("--output", help="output folder (default: the grid's `output`)")
    p.add_argument("--data-root", help="prepared data folder (default: the grid's `data.root`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctseg experiment", description="Run and report grids of experiments."
    )
    sub = parser.add_subparsers(dest="action", required=True)

    run = sub.add_parser(
        "run",
        help="run every cell that is not finished (resumes interrupted ones)",
        description="Run the grid's cells, each as `ctseg fit` in its own process and folder. Finished cells are "
        "skipped, interrupted ones resumed from checkpoints/last.ckpt. Arguments after `--` go to every `ctseg fit`.",
    )
    _grid_args(run)
    run.add_argument(
        "--only",
        action="append",
        metavar="CELL",
        help="run only this cell (<model>/<setting>/seed<N>; shell patterns allowed); repeatable",
    )
    run.add_argument("--device", choices=("cpu", "gpu", "cuda", "mps", "auto"), help="trainer.accelerator")
    run.add_argument("--devices", help="trainer.devices (e.g. 1, 4 or 0,1)")
    run.add_argument("--jobs", type=int, default=1, help="cells to run at the same time (default 1)")
    run.add_argument(
        "--force", action="store_true", help="take over other hosts' locks; re-run changed cells"
    )
    run.add_argument("--no-retry", action="store_true", help="do not retry cells whose last attempt failed")
    run.add_argument("--verbose", action="store_true", help="echo all output of the cells")
    run.add_argument("fit_args", nargs="*", help="after `--`: extra `ctseg fit` arguments for every cell")

    ls = sub.add_parser("list", help="list the grid's cells with their status (or job commands)")
    _grid_args(ls)
    ls.add_argument(
        "--commands", action="store_true", help="print one `ctseg experiment run --only` line per open cell"
    )
    ls.add_argument("--ids", action="store_true", help="print only the cell ids (all cells)")

    rep = sub.add_parser("report", help="write the grid report from the run folders")
    rep.add_argument("dir", help="grid output folder (or any folder holding run folders)")
    rep.add_argument("--out", help="report folder (default: DIR/report)")
    rep.add_argument("--baseline", help="setting the others are compared with (default: the grid's)")
    rep.add_argument("--title", help="report title (default: the grid name)")
    return parser


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    fit_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, fit_args = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    if args.action == "report":
        from ctseg.experiments.report import write_report

        rep = write_report(args.dir, args.out, baseline=args.baseline, title=args.title)
        print(
            f"report: {rep.paths['markdown']} ({sum(len(r.runs) for r in rep.rows)} runs, {len(rep.rows)} rows)"
        )
        for note in rep.notes:
            print(f"  note: {note}")
        return 0

    grid = load_grid(args.grid, output=args.output, data_root=args.data_root)
    if args.action == "list":
        from ctseg.experiments.runner import cell_status

        for cell in grid.cells():
            if args.ids:
                print(cell.id)
                continue
            status = cell_status(cell)
            if args.commands:
                if status != "finished":
                    extra = []
                    if args.output:
                        extra += ["--output", args.output]
                    if args.data_root:
                        extra += ["--data-root", args.data_root]
                    print(
                        shlex.join(["ctseg", "experiment", "run", str(grid.path), *extra, "--only", cell.id])
                    )
            else:
                print(f"{cell.id:<40} {status:<12} {cell.run_dir}")
        return 0

    from ctseg.experiments.runner import RunOptions, run_grid

    options = RunOptions(
        device=args.device,
        devices=args.devices,
        fit_args=list(args.fit_args) + fit_args,
        jobs=args.jobs,
        force=args.force,
        rerun_failed=not args.no_retry,
        verbose=args.verbose,
        python=sys.executable,
        command=shlex.join(["ctseg", "experiment", *argv, *(["--", *fit_args] if fit_args else [])]),
    )
    # A scheduler's SIGTERM (e.g. a job's time limit) stops the cells cleanly, like Ctrl-C; they resume later.
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        outcomes = run_grid(grid, args.only, options)
    finally:
        signal.signal(signal.SIGTERM, previous)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(f"grid {grid.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    bad = [o for o in outcomes if o.status in ("failed", "busy")]
    for o in bad:
        print(f"  {o.cell.id}: {o.status}: {o.message}", file=sys.stderr)
    return 1 if bad else 0
