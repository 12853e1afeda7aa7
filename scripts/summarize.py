"""Summarize a sweep: final validation metrics per configuration, mean ± std over seeds, as a table, CSV and plot.

    python scripts/summarize.py outputs/multirun/2026-11-25/15-49-00-118342
    python scripts/summarize.py outputs/multirun/2026-11-25/15-49-00-118342 --metric val/obs

Every directory under the sweep directory that holds TensorBoard event files is a job. A job's final value of each
`val/*` scalar is read from its event files (TensorBoard's own reader, so resumed runs read as one), and its
configuration from `.hydra/overrides.yaml`. Jobs whose overrides differ only in `seed` (and in keys that do not change
what a job computes: hydra.job.config.override_dirname.exclude_keys, but for trainer.steps) form one configuration. The table goes to stdout,
sorted by the main metric (lower is better; --higher-is-better for a rate such as eval/terminated_recall), and is
written to <sweep dir>/summary.csv; <sweep dir>/summary.png plots
the main metric against the swept values.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import signal
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

METRIC_PREFIX = "val/"
FINISHED_PREFIX = "hparams/"  # train.py logs hparams/* once, when a run has made all its updates
IGNORED_KEYS = {"seed"}
#: Left out of job directory names (so that a sweep continued with more updates finds its jobs again), but two jobs
#: with different values of it computed different things.
STILL_CONFIGURATION = {"trainer.steps"}


@dataclass
class Job:
    dir: Path
    overrides: dict[str, str]  # key -> value as written on the command line
    typed: dict[str, object]  # key -> parsed value (numbers as numbers), for sorting and plotting
    finals: dict[str, float]  # tag -> last logged value
    finished: bool  # made all its updates (not diverged, failed, or still running)
    seed: str | None = None  # the seed it ran with (from .hydra/config.yaml), None where unknown


@dataclass
class Group:
    config: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)

    def values(self, tag: str) -> list[float]:
        return [j.finals[tag] for j in self.jobs if tag in j.finals]


class SummaryError(Exception):
    pass


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories holding event files, outside hidden folders (.submitit, .hydra), in job-number order."""
    dirs = {p.parent for p in sweep_dir.rglob("events.out.tfevents.*") if _visible(p.parent, sweep_dir)}

    def order(d: Path):
        num = re.match(r"\d+", d.name)
        return (str(d.parent), int(num.group()) if num else math.inf, d.name)

    return sorted(dirs, key=order)


def failed_before_logging(sweep_dir: Path, logged: set[Path]) -> list[Path]:
    """Training runs' directories with a saved config (.hydra/overrides.yaml) but no event file: jobs that stopped
    before their logger started (a missing dataset file, say). Those of other scripts (evaluate.py, collect.py, under
    outputs/ too) never log to TensorBoard: not runs at all."""
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted(d for d in found - logged if _visible(d, sweep_dir) and _script(d) in (None, "train"))


def _script(job_dir: Path) -> str | None:
    """The script that wrote the job's directory (hydra.job.name: train, evaluate, collect), or None."""
    name = _saved(job_dir, "hydra.yaml", "hydra.job.name")
    return None if name is None else str(name)


def _hydra_file(job_dir: Path, file: str) -> DictConfig:
    """The job's .hydra/`file` (config.yaml: the run's values; hydra.yaml: Hydra's own); empty where it has none."""
    path = job_dir / ".hydra" / file
    return OmegaConf.load(path) if path.is_file() else OmegaConf.create()


def _saved(job_dir: Path, file: str, key: str):
    """`key` in the job's .hydra/`file`, or None."""
    return OmegaConf.select(_hydra_file(job_dir, file), key)


def _visible(job_dir: Path, sweep_dir: Path) -> bool:
    """Outside hidden folders (.submitit, .hydra): a job's directory, not a launcher's or Hydra's own files."""
    return not any(part.startswith(".") for part in job_dir.relative_to(sweep_dir).parts)


def read_overrides(job_dir: Path) -> tuple[dict[str, str], dict[str, object]]:
    """The job's task overrides that define its configuration: {key: text} and {key: parsed value}."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}, {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ignored = set(IGNORED_KEYS)
    excluded = _saved(job_dir, "hydra.yaml", "hydra.job.config.override_dirname.exclude_keys")
    ignored |= set(excluded or []) - STILL_CONFIGURATION
    texts, typed = {}, {}
    for override in OverridesParser.create().parse_overrides(list(OmegaConf.load(path))):
        key = override.key_or_group
        if key in ignored or key.startswith("hydra"):
            continue
        texts[key] = override.get_value_element_as_str() if override.value() is not None else "null"
        value = override.value()
        typed[key] = value if isinstance(value, int | float | str | bool) else texts[key]
    return texts, typed


def read_finals(job_dir: Path, also: tuple[str, ...] = ()) -> tuple[dict[str, float], int | None]:
    """Last value of every val/* scalar (and of the tags `also`, such as eval/nmse_h15, the same figure for every
    model) in the job's own event files (not its subdirectories), and, if the job finished, how many updates it made:
    the step of its hparams/* summary, written at the end of a run, where that is at least as late as every other
    point it logged (a resumed run drops its earlier summary; the step test also covers logs written before it did).
    None for a job that did not finish."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 1, "tensors": 1, "histograms": 1, "audio": 1, "compressedHistograms": 1}
    acc = EventAccumulator(str(job_dir), size_guidance=guidance)
    acc.Reload()
    tags = [tag for tag in acc.Tags()["scalars"] if acc.Scalars(tag)]  # a tag whose points were all purged has none
    finals = {tag: acc.Scalars(tag)[-1].value for tag in tags if tag.startswith(METRIC_PREFIX) or tag in also}

    def last_step(summaries: bool) -> int | None:
        steps = [acc.Scalars(tag)[-1].step for tag in tags if tag.startswith(FINISHED_PREFIX) == summaries]
        return max(steps, default=None)

    summary, latest = last_step(True), last_step(False)
    return finals, summary if summary is not None and (latest is None or summary >= latest) else None


def load_jobs(sweep_dir: Path, metric: str = "") -> list[Job]:
    jobs = []
    for job_dir in find_job_dirs(sweep_dir):
        texts, typed = read_overrides(job_dir)
        finals, made = read_finals(job_dir, also=(metric,))
        config = _hydra_file(job_dir, "config.yaml")  # read once: its trainer.steps and seed
        saved, seed = OmegaConf.select(config, "trainer.steps"), OmegaConf.select(config, "seed")
        if made is not None and ("trainer.steps" in texts or saved not in (None, made)):
            # .hydra/ holds the last command's values: a job of a continued sweep that had nothing left to do, or
            # that was continued alone to more updates, made another number of updates than they say.
            texts["trainer.steps"], typed["trainer.steps"] = str(made), made
        jobs.append(Job(job_dir, texts, typed, finals, made is not None, None if seed is None else str(seed)))
    return jobs



def group_jobs(jobs: list[Job]) -> tuple[list[Group], list[str], dict[str, str]]:
    """Groups of jobs with the same configuration, the keys that vary across groups, and the keys that do not."""
    keys = sorted({k for j in jobs for k in j.overrides})
    groups: dict[tuple, Group] = {}
    for job in jobs:
        config = tuple((k, job.overrides.get(k, "<default>")) for k in keys)
        groups.setdefault(config, Group(config)).jobs.append(job)
    swept = [k for i, k in enumerate(keys) if len({g.config[i][1] for g in groups.values()}) > 1]
    fixed = {k: v for k, v in next(iter(groups.values())).config if k not in swept} if groups else {}
    return list(groups.values()), swept, fixed


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def typed_value(group: Group, key: str):
    return group.jobs[0].typed.get(key, dict(group.config)[key])


def shown_value(group: Group, key: str) -> str:
    """The value for the table and the plot: floats to 4 significant digits (summary.csv keeps them whole)."""
    value = typed_value(group, key)
    return f"{value:.4g}" if isinstance(value, float) else dict(group.config)[key]


def summarize(sweep_dir: Path, metric: str, higher_is_better: bool = False
              ) -> tuple[list[Group], list[str], dict[str, str], list[str]]:  # fmt: skip
    if not sweep_dir.is_dir():
        raise SummaryError(f"{sweep_dir} is not a directory. Pass a sweep's directory: outputs/multirun/<date>/<time>.")
    jobs = load_jobs(sweep_dir, metric)
    if not jobs and (unlogged := failed_before_logging(sweep_dir, set())):
        raise SummaryError(
            f"None of the {len(unlogged)} runs under {sweep_dir} logged anything: each has a config (.hydra/) but no "
            f"TensorBoard event file, so each failed before training (its train.log says why; e.g. {unlogged[0]}), "
            "or is still starting."
        )
    if not jobs:
        raise SummaryError(
            f"{sweep_dir} holds no runs: no TensorBoard event files (events.out.tfevents.*) were found in it or its "
            "subdirectories. Pass the directory a sweep wrote (python scripts/train.py -m ... prints it at the end, "
            "outputs/multirun/<date>/<time> by default), or a single run's directory."
        )
    # A job that diverged, failed or is still running has val/* points too (the first at step 0): not final values.
    finished = [j for j in jobs if j.finished]
    done = [j for j in finished if metric in j.finals]
    if not done:
        tags = sorted({t for j in finished for t in j.finals})
        raise SummaryError(
            f"None of the {len(jobs)} runs under {sweep_dir} finished (diverged, failed or still running: no hparams/* "
            "summary, which a run writes when it has made all its updates). Wait for them to finish."
            if not finished else
            f"None of the {len(finished)} finished runs under {sweep_dir} logged {metric} (logged: "
            f"{', '.join(tags) or 'none'}; any other scalar tag they logged, such as eval/nmse_h15, works too). "
            "Choose another --metric."
        )  # fmt: skip
    unlogged = failed_before_logging(sweep_dir, {j.dir for j in jobs})
    for job_dir in unlogged:
        print(f"note: {job_dir} has a config but no TensorBoard logs (failed before training, or still in its "
              "prefill); left out", file=sys.stderr)  # fmt: skip
    for job in jobs:
        if not job.finished:
            print(f"note: {job.dir} did not finish (diverged, failed or still running); left out", file=sys.stderr)
        elif job not in done:
            print(f"note: {job.dir} has no {metric}; left out", file=sys.stderr)
    # An Optuna study may propose the same values twice (all searched keys categorical, say): a second run of one
    # configuration with the same seed is no second seed, and would show as n=2 with a spread of 0.
    first: dict[tuple, Job] = {}
    for job in list(done):
        if job.seed is None:
            continue
        same = first.setdefault((tuple(sorted(job.overrides.items())), job.seed), job)
        if same is not job:
            print(f"note: {job.dir} ran the configuration and seed of {same.dir.name}; counted once", file=sys.stderr)
            done.remove(job)
    groups, swept, fixed = group_jobs(done)
    if "trainer.seq_len" in swept and metric.startswith(METRIC_PREFIX):
        windows = {_saved(j.dir, "config.yaml", "trainer.val_seq_len") for j in done}
        if None in windows or len(windows) > 1:  # None: each job's own seq_len (trainer.val_seq_len=null, or older)
            print(f"note: trainer.seq_len varies and {metric} was scored on windows of each job's own seq_len (a "
                  "longer one scores lower by that alone): rank by eval/* (--metric eval/nmse_h15), or rerun with a "
                  "fixed trainer.val_seq_len", file=sys.stderr)  # fmt: skip
    # A value shared by the jobs shown is not "fixed" if the jobs left out (logged or not) had others.
    every = [j.overrides for j in jobs] + [read_overrides(d)[0] for d in unlogged]
    varied = [k for k in fixed if len({o.get(k, "<default>") for o in every}) > 1]
    fixed, swept = {k: v for k, v in fixed.items() if k not in varied}, swept + varied  # shown as columns instead
    groups.sort(key=lambda g: mean_std(g.values(metric))[0], reverse=higher_is_better)
    tags = [metric] + sorted({t for j in done for t in j.finals} - {metric})
    return groups, swept, fixed, tags


def write_table(groups, swept, fixed, tags, metric, out=None, higher_is_better: bool = False) -> None:
    # out=None prints to sys.stdout as it is at the call (a default of sys.stdout would be the one at import)
    header = [*swept, "n", *tags]
    rows = [
        [*(shown_value(g, k) for k in swept), str(len(g.values(metric))), *(fmt(*mean_std(g.values(t))) for t in tags)]
        for g in groups
    ]
    if not swept:
        header, rows = ["config", *header], [["(all runs)", *r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    if fixed:
        print("fixed: " + " ".join(f"{k}={v}" for k, v in fixed.items()), file=out)
    better = "higher" if higher_is_better else "lower"
    print(f"{metric}: final value, mean ± std over seeds (n runs); sorted by {metric}, {better} is better", file=out)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=out)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=out)


def write_csv(path: Path, groups, swept, tags, metric) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*swept, "n", *(f"{t}_{s}" for t in tags for s in ("mean", "std")), "runs"])
        for g in groups:
            stats = [x for t in tags for x in mean_std(g.values(t))]
            writer.writerow([*(dict(g.config)[k] for k in swept), len(g.values(metric)),
                             *("" if math.isnan(x) else repr(x) for x in stats),
                             ";".join(j.dir.name for j in g.jobs)])  # fmt: skip


def write_plot(path: Path, groups, swept, metric, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [mean_std(g.values(metric)) for g in groups]
    err = [0.0 if math.isnan(s) else s for _, s in stats]
    xs = [typed_value(g, swept[0]) for g in groups] if len(swept) == 1 else []
    numeric = bool(xs) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    if numeric:  # one swept number: metric against it, error bars over seeds
        fig, ax = plt.subplots(figsize=(6, 4))
        order = sorted(range(len(groups)), key=lambda i: xs[i])
        ax.errorbar([xs[i] for i in order], [stats[i][0] for i in order], yerr=[err[i] for i in order],
                    marker="o", capsize=4)  # fmt: skip
        if min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        if len(set(xs)) <= 10:
            ax.set_xticks(sorted(set(xs)), [f"{x:.4g}" if isinstance(x, float) else str(x) for x in sorted(set(xs))])
        ax.set_xlabel(swept[0])
        ax.set_ylabel(f"final {metric}")
    else:  # several swept keys, or a non-numeric one: one bar per configuration, best at the top
        labels = ["\n".join(f"{k}={shown_value(g, k)}" for k in swept) or "all runs" for g in groups]
        width = 4.5 + 0.08 * max(len(line) for label in labels for line in label.split("\n"))
        fig, ax = plt.subplots(figsize=(width, 1.2 + len(groups) * (0.25 + 0.2 * max(1, len(swept)))))
        ax.barh(range(len(groups)), [m for m, _ in stats], xerr=err, capsize=4, color="tab:blue")
        ax.set_yticks(range(len(groups)), labels)
        ax.invert_yaxis()
        ax.set_xlabel(f"final {metric}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir), or any parent of runs")
    parser.add_argument("--metric", default="val/loss", help="main metric, lower is better (default: val/loss); any "
                        "scalar tag, e.g. eval/nmse_h15 to rank models with different losses")  # fmt: skip
    parser.add_argument("--higher-is-better", action="store_true", help="rank the main metric from the highest, "
                        "for a rate such as eval/terminated_recall")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        groups, swept, fixed, tags = summarize(args.sweep_dir, args.metric, args.higher_is_better)
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_table(groups, swept, fixed, tags, args.metric, higher_is_better=args.higher_is_better)
    csv_path, png_path = args.sweep_dir / "summary.csv", args.sweep_dir / "summary.png"
    write_csv(csv_path, groups, swept, tags, args.metric)
    print(f"wrote {csv_path}")
    n_runs = sum(len(g.jobs) for g in groups)
    title = f"{args.sweep_dir.resolve().name}: final {args.metric}, mean ± std over seeds ({n_runs} runs)"
    write_plot(png_path, groups, swept, args.metric, title)
    print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `summarize.py ... | head` ends quietly, as other commands do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
