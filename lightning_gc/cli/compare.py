"""``lightning-gc compare``: train baseline and GC for several seeds, summarise, and show it in TensorBoard.

Example:
    lightning-gc compare digits-cnn --seeds 3 --max-epochs 5
    lightning-gc compare my-digits --config configs/settings/high_lr.yaml --out runs/high_lr -- --data.batch_size 32
    lightning-gc compare my-digits --seeds 5 --sweep model.lr=0.02,0.05,0.1,0.2 --jobs 2
    lightning-gc compare my-digits --arms baseline,gc,gc_update --launcher slurm --slurm-partition gpu --slurm-gpus-per-run 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

_EPILOG = """\
Every run is `python train.py fit --config configs/<arm>.yaml [--config SETTING] --seed_everything K ...` in the
project folder, logged to TensorBoard under OUT/[<point>/]<arm>/seed_K; arguments after `--` go to every run.
A run whose training loss turns non-finite is stopped and counted as diverged; one that finishes dead (final
metric no better than a constant predictor's, or vanishing gradients) as collapsed; a run that fails is
reported with its log and the others go on. Exit code: 0, or 1 if a run failed, 2 for invalid input,
130 when interrupted (Ctrl-C, SIGTERM, SIGHUP: every run is stopped, SLURM jobs cancelled)."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``compare`` subcommand to the ``lightning-gc`` parser."""
    parser = subparsers.add_parser(
        "compare",
        help="train baseline and GC for several seeds and summarise the difference",
        description="Does GC help on this task? Train each arm (configs/<arm>.yaml: baseline, gc, ...) of a project for each seed,"
        " at each sweep point, then summarise the arms side by side (summary.md, summary.csv, curves.png, sweep.png,"
        " TensorBoard).",
        usage="%(prog)s PROJECT_DIR [--arms A,B,...] [--seeds N] [--max-epochs N] [--config CONFIG]"
        " [--sweep KEY=V1,V2,...] [--out DIR] [--resume | --overwrite] [--metric METRIC --mode {min,max}]"
        " [--target X] [--chance X] [--jobs N] [--devices-per-run N] [--share-devices] [--launcher {local,slurm}]"
        " [--slurm-partition P] [--slurm-time T] [--slurm-gpus-per-run N] [--slurm-cpus-per-run N]"
        " [--slurm-arg OPTION] [-- LightningCLI arguments]",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "project", metavar="PROJECT_DIR", help="a project folder (template convention) or a template name"
    )
    parser.add_argument(
        "--arms",
        type=_arms,
        default=("baseline", "gc"),
        metavar="A,B,...",
        help="arms to compare, each a configs/<arm>.yaml of the project; the first is the reference of the"
        " differences (default baseline,gc)",
    )
    parser.add_argument(
        "--seeds", type=_positive("--seeds"), default=3, metavar="N", help="seeds 0..N-1, each in every arm (default 3)"
    )
    parser.add_argument(
        "--max-epochs",
        type=_positive("--max-epochs"),
        default=None,
        metavar="N",
        help="epochs per run (default: the configs')",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="CONFIG",
        help="setting config applied after each arm's config, e.g. configs/settings/high_lr.yaml (repeatable)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="run every arm and seed at each value of a LightningCLI key, e.g. model.lr=0.02,0.05,0.1; repeatable"
        " (a grid); runs go to OUT/<key=value>/<arm>/seed_K, the sweep to OUT/sweep.csv, OUT/sweep.png",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/compare/<project>[-<setting>])")
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of an earlier run of this comparison (and wait for its SLURM jobs still queued"
        " or running)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="remove what an earlier comparison wrote in --out first (anything else there is kept)",
    )
    parser.add_argument("--metric", help="primary validation metric (default: the ModelCheckpoint's monitor)")
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher --metric is better")
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="X",
        help="metric value for 'steps to target' (default: within 5%% of the best)",
    )
    parser.add_argument(
        "--chance",
        type=float,
        default=None,
        metavar="X",
        help="the metric of a constant predictor: a finished run no better is 'collapsed' (default: the validation"
        " labels' majority-class share, for an accuracy)",
    )
    local = parser.add_argument_group("on this machine (--launcher local)")
    local.add_argument(
        "--jobs",
        type=_positive("--jobs"),
        default=1,
        metavar="N",
        help="runs at once (default 1); CPU threads are split",
    )
    local.add_argument(
        "--devices-per-run",
        type=_positive("--devices-per-run"),
        default=None,
        metavar="N",
        help="GPUs per run, given through CUDA_VISIBLE_DEVICES and --trainer.devices (default 1 when there are GPUs)",
    )
    local.add_argument(
        "--share-devices", action="store_true", help="allow more runs at once than GPUs (runs then share devices)"
    )
    parser.add_argument(
        "--launcher", choices=("local", "slurm"), default="local", help="where runs run (default local)"
    )
    slurm = parser.add_argument_group("on a SLURM cluster (--launcher slurm; pip install 'lightning-gc[slurm]')")
    slurm.add_argument("--slurm-partition", metavar="P", help="sbatch --partition")
    slurm.add_argument("--slurm-time", metavar="T", help="sbatch --time per run, e.g. 02:00:00")
    slurm.add_argument(
        "--slurm-gpus-per-run",
        type=_count("--slurm-gpus-per-run"),
        default=0,
        metavar="N",
        help="GPUs per run (default 0)",
    )
    slurm.add_argument(
        "--slurm-cpus-per-run",
        type=_positive("--slurm-cpus-per-run"),
        default=1,
        metavar="N",
        help="CPUs per run (default 1)",
    )
    slurm.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="another sbatch option for every job, e.g. --slurm-arg=--qos=high (repeatable)",
    )
    parser.set_defaults(run=run, accepts_extra=True)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Run ``lightning-gc compare`` for parsed ``args``; ``extra`` holds the LightningCLI arguments given after
    ``--``. Returns the exit code."""
    from lightning_gc.compare import CompareOptions, ProjectError, run_comparison

    if extra and extra[0] != "--":
        return _error(f"unrecognized arguments: {' '.join(extra)} (LightningCLI arguments go after `--`)")
    try:
        options = CompareOptions(
            project=args.project,
            seeds=args.seeds,
            max_epochs=args.max_epochs,
            configs=tuple(args.config),
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            metric=args.metric,
            mode=args.mode,
            target=args.target,
            lightning_args=tuple(extra[1:]),
            arms=args.arms,
            sweep=tuple(args.sweep),
            jobs=args.jobs,
            devices_per_run=args.devices_per_run,
            share_devices=args.share_devices,
            launcher=args.launcher,
            slurm_partition=args.slurm_partition,
            slurm_time=args.slurm_time,
            slurm_gpus_per_run=args.slurm_gpus_per_run,
            slurm_cpus_per_run=args.slurm_cpus_per_run,
            slurm_args=tuple(args.slurm_arg),
            chance=args.chance,
        )
        result = run_comparison(options)
    except ProjectError as err:
        return _error(str(err))
    except KeyboardInterrupt as stop:
        from lightning_gc.compare.output import again

        why = f"stopped by {stop}" if str(stop) else "interrupted"
        print(
            f"\nlightning-gc compare: {why}; its runs were stopped. To finish later, {again('--resume')} with the"
            " same options",
            file=sys.stderr,
        )
        return 130
    return 1 if result.failed else 0


def _positive(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be an integer >= 1, got {text!r}")
        return value

    return parse


def _count(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"{option} must be an integer >= 0, got {text!r}")
        return value

    return parse


def _arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(","))
    if len(arms) < 2 or any(not a for a in arms):
        raise argparse.ArgumentTypeError(f"--arms must be two or more comma-separated arm names, got {text!r}")
    return arms


def _error(message: str) -> int:
    print(f"lightning-gc compare: error: {message}", file=sys.stderr)
    return 2
