"""How far ahead does each world model predict? Trains every (env, model) pair with the default trainer, then scores
open-loop predictions on episodes of a *different* policy (sticky random actions: held actions reach states the
uniform random policy rarely visits) next to the copy-last baseline. Prints a markdown table.

    python benchmarks/open_loop_table.py                          # every env config x every model config
    python benchmarks/open_loop_table.py --envs cartpole --models gru --steps 500   # a quick look
    python benchmarks/open_loop_table.py --envs pendulum --models gru --overrides experiment=pendulum  # a preset

--overrides are passed to every scripts/train.py run as they are (Hydra syntax), after the env and model.

Each cell runs the same commands a user would: scripts/collect.py, scripts/train.py, scripts/evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, args: list[str]) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=sorted(p.stem for p in (REPO / "conf" / "env").glob("*.yaml")))
    parser.add_argument("--models", nargs="+", default=sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
    parser.add_argument("--steps", type=int, default=None, help="trainer.steps (default: the trainer config's)")
    parser.add_argument("--episodes", type=int, default=100, help="evaluation episodes per env")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for scripts/train.py, e.g. experiment=pendulum model.open_loop_steps=4")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for env in args.envs:
            data = tmp / f"{env}_sticky.npz"
            run("collect.py", [f"env={env}", f"episodes={args.episodes}", "policy=sticky", f"seed={args.seed + 99}",
                               f"out={data}", f"hydra.run.dir={tmp / 'collect' / env}"])  # fmt: skip
            for model in args.models:
                run_dir = tmp / "runs" / f"{env}_{model}"
                overrides = [f"env={env}", f"model={model}", f"seed={args.seed}", "trainer.progress=false",
                             "trainer.eval_figure=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
                if args.steps:
                    overrides.append(f"trainer.steps={args.steps}")
                overrides += args.overrides
                start = time.perf_counter()
                run("train.py", overrides)
                seconds = time.perf_counter() - start
                eval_dir = tmp / "eval" / f"{env}_{model}"
                run("evaluate.py", [f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"data={data}",
                                    f"hydra.run.dir={eval_dir}"])  # fmt: skip
                m = json.loads((eval_dir / "metrics.json").read_text())
                rows.append({"env": env, "model": model, "overrides": args.overrides, "train_s": round(seconds, 1), **m})
                print(f"done {env} {model} in {seconds:.0f}s", file=sys.stderr, flush=True)

    hs = ["1", "5", "15"]
    print("| env | model | " + " | ".join(f"nmse h{h}" for h in hs) + " | " + " | ".join(f"copy-last h{h}" for h in hs)
          + " | windows | train time |")  # fmt: skip
    print("|" + " --- |" * (2 + 2 * len(hs) + 2))
    for r in rows:
        cells = [f"{r['nmse'].get(h, float('nan')):.2g}" for h in hs] + [f"{r['copy_last_nmse'].get(h, float('nan')):.2g}" for h in hs]
        print(f"| {r['env']} | {r['model']} | " + " | ".join(cells) + f" | {r['windows']} | {r['train_s']:.0f} s |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
