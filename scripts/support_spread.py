"""How far from the data's own actions trained runs act, on a dataset made by ``aepo-lite make-dataset``
(aepo_lite.rl.oracle.snapshot_action_spread): each run's evaluation episodes at each guidance scale, the actions
measured against the policy that made the data, in units of its action noise. Writes a CSV and its Markdown table
beside it (``aepo-lite figures`` re-renders the table from the CSV alone); a rerun skips the rows the CSV has.

    python scripts/support_spread.py --runs runs/rl6c-big-s49/*-hopper/local_hopper_medium-v0/*-s5 --scales 0 3 10 \
        --out figures/rl_6c_big/support_spread.csv
"""
from __future__ import annotations

import argparse

import torch

from aepo_lite.rl.agent import estimator_label, load_run
from aepo_lite.rl.oracle import snapshot_action_spread
from aepo_lite.rl.diagnostics import SUPPORT_SPREAD_COLUMNS, csv_per_run, render_support_spread


def _key(r: dict) -> tuple:
    w = "" if r["label"] == "data" else round(float(r["guidance_scale"]), 9)
    return (r["dataset"], r["run"], w, int(r["episodes"]))


def _policy(agent, w: float, seed: int):
    g = torch.Generator(device=agent.device).manual_seed(seed)
    return lambda obs: agent.act(obs, w, generator=g)


def _run_rows(run: str, scales, episodes: int, rows: list[dict]) -> list[dict]:
    agent, cfg, _ = load_run(run)
    done = {_key(r) for r in rows}
    todo = [w for w in ([0.0] if cfg.method == "bc" else scales)
            if (cfg.dataset, run, round(float(w), 9), episodes) not in done]
    have_data = any(r["dataset"] == cfg.dataset and r["label"] == "data" for r in rows)
    if not todo:
        print(f"skip {run}: in the CSV")
        return []
    label = estimator_label(cfg)
    got = snapshot_action_spread(cfg.dataset, {f"{label} w={w:g}": _policy(agent, float(w), cfg.seed) for w in todo},
                                 episodes=episodes, with_data=not have_data)  # the data's row once per dataset
    out = [] if have_data else [{"dataset": cfg.dataset, "run": "", "seed": "", "guidance_scale": "", **got.pop(0)}]
    for w, r in zip(todo, got):
        out.append({"dataset": cfg.dataset, "run": run, **r, "label": label, "seed": cfg.seed, "guidance_scale": w})
        print(f"{run} w={w:g}: RMS z {r['z_rms']:.2f}, beyond 3 stds {100 * r['beyond3']:.1f}% of "
              f"{r['steps']} steps, score {r['score_mean']:.1f}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="trained run directories (aepo-lite train or sweep)")
    p.add_argument("--scales", nargs="+", type=float, default=[0.0, 3.0, 10.0], help="guidance scales (bc: 0 only)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per run and scale (reset seeds 100000 + i)")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    for path in csv_per_run(a.out, a.runs, lambda run, rows: _run_rows(run, a.scales, a.episodes, rows), SUPPORT_SPREAD_COLUMNS, render_support_spread):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
