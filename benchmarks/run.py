"""Every benchmark, one table. Each row measures ours and its baseline in the same run and prints the ratio.

    python benchmarks/run.py                 # all four rows on this machine (about 15 minutes on 2 CPU cores)
    python benchmarks/run.py --quick         # smaller sizes and fewer repeats (a few minutes)
    python benchmarks/run.py --device cuda   # also the CUDA rows (sampling from a GPU-resident buffer, updates);
                                             # time to quality then runs on the GPU (--device cpu: on the CPU)
    python benchmarks/run.py --only sampling updates --json results.json
    python benchmarks/run.py --device cuda --device-only --only updates   # the CUDA rows of updates alone

Each row is printed as soon as it is measured (a run stopped by a time limit keeps what it finished), then the table
(also when a benchmark fails: the rows measured before it are printed and saved, then the error is raised).

TorchRL's SliceSampler joins the sampling row when torchrl is installed: pip install -e ".[bench]".
Benchmarks are never tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however this file is started

import torch  # noqa: E402

from common import print_table, table_line, write_json  # noqa: E402
from worldmodel.errors import ConfigError  # noqa: E402
from worldmodel.runtime import resolve_device  # noqa: E402

BENCHES = ("sampling", "collection", "updates", "time-to-quality")


def main(only: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for the GPU rows (default: cuda when available)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="updates: also measure trainer.compile=true")
    parser.add_argument("--device-only", action="store_true",
                        help="updates: only the --device rows, not the CPU rows as well")  # fmt: skip
    parser.add_argument("--only", nargs="*", choices=BENCHES, default=only or list(BENCHES))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    try:  # a wrong device is refused here, not after the CPU rows have run
        args.device = str(resolve_device(args.device, key="--device"))  # auto -> cuda or cpu
    except ConfigError as err:
        parser.error(str(err))

    import bench_collection
    import bench_sampling
    import bench_time_to_quality
    import bench_updates

    runners = {
        "sampling": lambda: bench_sampling.rows(args.quick, args.device),
        "collection": lambda: bench_collection.rows(args.quick),
        "updates": lambda: itertools.chain(
            bench_updates.rows(args.quick, "cpu", args.compile) if args.device == "cpu" or not args.device_only else (),
            bench_updates.rows(args.quick, args.device, args.compile) if args.device != "cpu" else (),
        ),
        "time-to-quality": lambda: bench_time_to_quality.rows(args.quick, args.device),
    }
    rows = []
    try:
        for name in args.only:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            for row in runners[name]():
                print(table_line(row), flush=True)
                rows.append(row)
    finally:
        print_table(rows)
        if args.json:
            write_json(rows, args.json)


if __name__ == "__main__":
    main()
