"""``lightning-gc compare``: train baseline and GC for several seeds, summarise, and show it in TensorBoard.

Example:
    lightning-gc compare digits-cnn --seeds 3 --max-epochs 5
    lightning-gc compare my-digits --config configs/settings/high_lr.yaml --out runs/high_lr -- --data.batch_size 32
"""

from __future__ import annotations

import argparse
import sys

_EPILOG = """\
Every run is `python train.py fit --config configs/<arm>.yaml [--config SETTING] --seed_everything K ...` in the
project folder, logged to TensorBoard under OUT/<arm>/seed_K; arguments after `--` go to every run.
A run whose training loss turns non-finite is stopped and counted as diverged; a run that fails is
reported with its log and the others go on. Exit code: 0, or 1 if a run failed, 2 for invalid input."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` subcommand to the ``lightning-gc`` parser."""
    parser = subparsers.add_parser(
        "compare",
        help="train baseline and GC for several seeds and summarise the difference",
        description="Does GC help on this task? Train the baseline and the GC config of a project for each seed,"
        " then summarise both arms side by side (summary.md, summary.csv, curves.png, TensorBoard).",
        usage="%(prog)s PROJECT_DIR [--seeds N] [--max-epochs N] [--config CONFIG] [--out DIR] [--resume | --overwrite]"
        " [--metric METRIC --mode {min,max}] [--target X] [-- LightningCLI arguments]",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "project", metavar="PROJECT_DIR", help="a project folder (template convention) or a template name"
    )
    parser.add_argument(
        "--seeds", type=_positive("--seeds"), default=3, metavar="N", help="seeds 0..N-1, each in both arms (default 3)"
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
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/compare/<project>[-<setting>])")
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="keep the finished runs of an earlier run of this comparison"
    )
    again.add_argument("--overwrite", action="store_true", help="delete an earlier comparison in --out first")
    parser.add_argument("--metric", help="primary validation metric (default: the ModelCheckpoint's monitor)")
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher --metric is better")
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="X",
        help="metric value for 'steps to target' (default: within 5%% of the best)",
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
        )
        result = run_comparison(options)
    except ProjectError as err:
        return _error(str(err))
    except KeyboardInterrupt:
        print("\nlightning-gc compare: interrupted; finish later with the same command and --resume", file=sys.stderr)
        return 130
    return 1 if result.failed else 0


def _positive(option: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be an integer >= 1, got {text!r}")
        return value

    return parse


def _error(message: str) -> int:
    print(f"lightning-gc compare: error: {message}", file=sys.stderr)
    return 2
