"""Whether a SLURM cluster is reachable from here, for the tests that submit real jobs.

``.ci/slurm-up`` starts a one-node cluster on this machine (CI does, before ``make test``). Tests that need
one take the ``requires_slurm`` fixture::

    from slurm_cluster import requires_slurm  # noqa: F401  (registers the fixture in the module)

    pytestmark = pytest.mark.usefixtures("requires_slurm")

Without a cluster they are skipped with the reason; with ``LIGHTNING_GC_REQUIRE_SLURM=1`` (CI) they fail.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

REQUIRE_VARIABLE = "LIGHTNING_GC_REQUIRE_SLURM"
USABLE_NODE_STATES = ("idle", "mix", "alloc", "comp")  # sinfo %t: a node that runs (or will run) jobs


@functools.lru_cache(maxsize=1)
def slurm_unavailable_reason() -> str | None:
    """Why no SLURM cluster can run jobs from here, or ``None`` when one can."""
    missing = [tool for tool in ("sinfo", "sbatch", "srun", "scontrol", "scancel") if shutil.which(tool) is None]
    if missing:
        return f"SLURM client tools not found ({', '.join(missing)}): start a test cluster with .ci/slurm-up"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return 'submitit is not installed: pip install "lightning-gc[slurm]"'
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s: is slurmctld running? (.ci/slurm-up)"
    if result.returncode != 0:
        return f"sinfo failed ({result.stderr.strip() or result.returncode}): start a test cluster with .ci/slurm-up"
    states = result.stdout.split()
    if not any(state.rstrip("*~#!%$@^-").startswith(USABLE_NODE_STATES) for state in states):
        return f"no SLURM node can run jobs (sinfo node states: {', '.join(states) or 'none'})"
    return None


def slurm_available() -> bool:
    """Whether a SLURM cluster with a usable node answers from here (and submitit is installed)."""
    return slurm_unavailable_reason() is None


@pytest.fixture
def requires_slurm() -> None:
    """Skip the test without a cluster, with the reason; fail instead when ``LIGHTNING_GC_REQUIRE_SLURM=1``."""
    reason = slurm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{REQUIRE_VARIABLE}=1 but no SLURM cluster: {reason}", pytrace=False)
    pytest.skip(f"no SLURM cluster: {reason}")
