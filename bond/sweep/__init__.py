"""Hyperparameter sweeps: every point of a grid of config overrides, run, resumed, tabulated and plotted.

    python -m bond.sweep --config=configs/sweeps/j_bond_eta.py --workdir=runs/eta
    python -m bond.sweep --config=configs/sweeps/j_bond_eta.py:quick --workdir=/tmp/eta --jobs=2
    python -m bond.sweep --config=configs/sweeps/bond_n.py --workdir=DIR --set=steps=100 --config.mode=processes

A sweep file (configs/sweeps/*.py) defines `get_config(arg)` returning `sweep_config(...)`:

    base      the config every point starts from, as `--config=` names it ("configs/j_bond.py:quick");
              the sweep file's own argument is appended to its variants (":quick" above);
    axes      a list of `product({field: values})` and `zipped({field: values})`; the points are the
              product of the axes (a `product` axis is every combination of its fields' values, a
              `zipped` axis takes its fields' i-th values together);
    seeds     config.seed values, one more product axis (the last); empty: the base's seed only;
    overrides "field=value" strings applied to the base before the axes (as `--config.field=value`);
    metric    the metric of the results table and plots, e.g. "eval/reward" (a summary "after" key);
    mode      'auto' (population when every varied field is traced, else processes), 'processes'
              or 'population';
    population_size  the most members one population program holds (0: all unfinished points).

Every point has a stable name, "field=value,...,seed=s" in axis order, and its own run folder
DIR/points/<name>, laid out as `train.run` leaves it. A point is finished when that folder has
summary.json. Rerunning a sweep (say after a kill) runs only the unfinished points, and a point
that was cut short resumes from its own checkpoints.

Modes.
  processes   each point is `python -m bond.main --config=<base> --workdir=<point dir>
              --config.<field>=<value> ...` (the exact command is saved as <point dir>/command.txt,
              its output as log.txt). At most `--jobs` run at once, default one per core: an XLA
              CPU process spreads large ops over all cores, but the small programs here keep about
              one core busy (sampling is a sequential while-loop), so one process per core is the
              faster use of a small machine; lower --jobs for large models. The reference (and
              reward model) is pretrained once, by the sweep, before the processes start. A point
              whose process fails gets error.txt and the sweep goes on; SIGTERM, Ctrl-C or the
              sweep's death (even by SIGKILL, on Linux) sends the running points SIGTERM, so they
              save a checkpoint and exit.
  population  every point trains at once as one vmapped program (bond/population.py): only for
              points that differ in traced fields (population.POPULATION_FIELDS: β, γ, η,
              learning rate and its scale, seed, ...). Each point's folder gets the same files as
              in processes mode.

Results: DIR/results.csv (one row per point: its values, status, steps and every final evaluation
metric), DIR/results.md (the same rows with the metric and `HEADLINE_METRICS`, then the metric's
mean ± standard deviation over seeds), DIR/sweep.json (the spec and the point names),
DIR/plots/curves.png (the metric against step for every point) and DIR/plots/final_vs_<field>.png
(the final metric against each swept field, seeds as dots and their mean as a line).

The package, by job: spec.py (the spec format, its points, their names, folders and configs),
running.py (process supervision, population dispatch, `run_sweep`), reporting.py (results tables
and plots), __main__.py (the command line). Every public name is importable from `bond.sweep`.
"""

from bond.sweep.reporting import (
    HEADLINE_METRICS, collect_results, group_over_seeds, plot_sweep, point_status, write_results,
)
from bond.sweep.running import (
    build_stages, choose_mode, point_command, population_groups, run_in_population, run_processes, run_sweep,
)
from bond.sweep.spec import (
    AXIS_KINDS, MODES, ROOT, Point, base_config, check_spec, expand_points, format_value, is_finished,
    load_sweep, parse_override, plan_sweep, point_config, point_dir, product, resolve_config_spec,
    sweep_config, with_base_args, zipped,
)

__all__ = [
    "AXIS_KINDS", "HEADLINE_METRICS", "MODES", "ROOT", "Point", "base_config", "build_stages", "check_spec",
    "choose_mode", "collect_results", "expand_points", "format_value", "group_over_seeds", "is_finished",
    "load_sweep", "parse_override", "plan_sweep", "plot_sweep", "point_command", "point_config", "point_dir",
    "point_status", "population_groups", "product", "resolve_config_spec", "run_in_population",
    "run_processes", "run_sweep", "sweep_config", "with_base_args", "write_results", "zipped",
]
