"""What the pre-launch check of a grid sweep costs: every job's config composed and validated before the first job
starts (worldmodel.sweep.check_sweep_jobs), against Hydra's own composition of the same jobs, which its basic
launcher does once per job as it launches it (the baseline: the least a sweep of that many jobs pays anyway).

    python benchmarks/bench_sweep_check.py [--jobs 200]

Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict, read_write

from worldmodel.sweep import check_sweep_jobs, sweep_jobs

CONF = Path(__file__).resolve().parents[1] / "conf"


def grid(jobs: int) -> list[str]:
    """Command-line overrides of a grid of about `jobs` jobs: seeds x learning rates x latent sizes."""
    side = max(1, round(jobs ** (1 / 3)))
    seeds = math.ceil(jobs / side**2)
    return [f"seed={','.join(map(str, range(seeds)))}",
            f"trainer.lr={','.join(f'{1e-3 * (i + 1):g}' for i in range(side))}",
            f"model.latent_dim={','.join(str(16 * (i + 1)) for i in range(side))}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="about this many jobs in the grid (default 200)")
    jobs = parser.parse_args().jobs
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.overrides.task = grid(jobs)
        every = sweep_jobs(cfg)
        loader = GlobalHydra.instance().config_loader()
        start = time.perf_counter()
        for overrides in every:  # what Hydra's BasicLauncher does for each job as it launches it
            loader.load_sweep_config(cfg, overrides)
        hydra_s = time.perf_counter() - start
        start = time.perf_counter()
        check_sweep_jobs(cfg)
        check_s = time.perf_counter() - start
    print(f"{len(every)} jobs: the pre-launch check took {check_s:.1f} s ({1e3 * check_s / len(every):.0f} ms a job); "
          f"Hydra's own composition of the same jobs {hydra_s:.1f} s; ratio {check_s / hydra_s:.2f}x")


if __name__ == "__main__":
    main()
