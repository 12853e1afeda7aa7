"""Score a trained world model's open-loop predictions on an episode dataset, next to the copy-last baseline.

    python scripts/evaluate.py checkpoint=outputs/<date>/<time>/checkpoints/last.pt data=data/cartpole_sticky.npz

Prints a table and writes metrics.json into this evaluation's own output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from worldmodel.checkpoint import load_world_model
from worldmodel.cli import user_errors
from worldmodel.config import validate_evaluate
from worldmodel.dataset import DatasetFile, fill_buffer
from worldmodel.errors import WorldModelError
from worldmodel.evaluation import open_loop
from worldmodel.replay import ReplayBuffer
from worldmodel.runtime import resolve_device


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    with user_errors():
        validate_evaluate(cfg)  # also checked before Hydra wrote the run dir (conf/evaluate.yaml's callback)
        device = resolve_device(cfg.device, key="device")
        model, payload = load_world_model(cfg.checkpoint, device)
        spec = payload["env_spec"]
        # The dataset goes through the same buffer as training data, so windows follow the same episode rules.
        with DatasetFile(cfg.data, spec["obs_dim"], spec["action_dim"], key="data", discrete=spec["discrete"]) as data:
            buffer = ReplayBuffer(int(data.lengths.sum()), spec["obs_dim"], spec["action_dim"], device=device,
                                  capacity_key=f"the transitions in data={cfg.data}", device_key="device")  # fmt: skip
            fill_buffer(buffer, data)
        result = open_loop(model, buffer, cfg.context, cfg.horizon, max_windows=cfg.max_windows)
        if result is None:
            raise WorldModelError(
                f"data={cfg.data}: no episode is {cfg.context + cfg.horizon - 1} steps long, so no window of context "
                f"{cfg.context} + horizon {cfg.horizon} fits; lower horizon or context."
            )
        metrics = {"checkpoint": str(cfg.checkpoint), "data": str(cfg.data), "env": spec["id"], **result.as_dict()}
        capped = f" of {result.available} (max_windows={cfg.max_windows}, evenly spread)" \
            if result.windows < result.available else ""  # fmt: skip
        print(f"{spec['id']}: {result.windows}{capped} windows, context {cfg.context}")
        print(f"{'horizon':>8} {'nmse':>12} {'copy-last':>12} {'reward mse':>12}")
        for h in result.report_horizons():
            print(f"{h:>8} {result.nmse[h - 1]:>12.3g} {result.copy_last_nmse[h - 1]:>12.3g} {result.reward_mse[h - 1]:>12.3g}")
        recall, alarms = ("none to score" if rate is None else f"{rate:.3g}"
                          for rate in (result.terminated_recall, result.terminated_false_alarms))  # fmt: skip
        print(f"terminations {result.terminations}: predicted (recall) {recall}; false alarms {alarms}")
        out = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        out.write_text(json.dumps(metrics, indent=2))
        print(f"wrote {out}")
        return metrics


if __name__ == "__main__":
    main()
