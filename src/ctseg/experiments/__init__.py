"""Experiment grids: (model × CT setting × seed) runs over one protocol, and their reports.

* :mod:`~ctseg.experiments.grid`: grid files and the cells they expand to;
* :mod:`~ctseg.experiments.runner`: each cell as a ``ctseg fit`` subprocess in its own folder (skip
  finished, resume interrupted, locks for several jobs or machines, test split on the selected checkpoint);
* :mod:`~ctseg.experiments.report`: Table-1-style table, Figure-3-style curves, per-class bars,
  confusion matrices from the run folders;
* :mod:`~ctseg.experiments.stats`: mean ± sample std, Welch's t-test, Holm adjustment.

CLI: ``ctseg experiment run | list | report`` (``docs/experiments.md``).
"""

from ctseg.experiments.grid import Cell, GridSpec, load_grid
from ctseg.experiments.report import GridReport, write_report
from ctseg.experiments.runner import RunOptions, cell_status, run_grid
from ctseg.experiments.stats import Summary, Welch, holm, welch, welch_from_stats

__all__ = [
    "Cell",
    "GridReport",
    "GridSpec",
    "RunOptions",
    "Summary",
    "Welch",
    "cell_status",
    "holm",
    "load_grid",
    "run_grid",
    "welch",
    "welch_from_stats",
    "write_report",
]
