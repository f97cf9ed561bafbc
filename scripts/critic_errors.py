"""A trained run's critic against the exact action values, on and off the data's support, on a dataset made by
``aepo-lite make-dataset`` (aepo_lite.rl.oracle.snapshot_q_errors): at the states the run's policy visits at each
guidance scale, its critic's advantages over the data policy's mean action against those of simulator rollouts.
Writes a CSV and its Markdown table beside it (``aepo-lite figures`` re-renders the table from the CSV alone); a
rerun skips the rows the CSV has.

    python scripts/critic_errors.py --runs runs/rl6c-big/big-energy-softmax-hopper/local_hopper_medium-v0/*-s5 \
        --scales 0 10 --out figures/rl_6c_big/critic_errors.csv
"""
from __future__ import annotations

import argparse

import torch

from aepo_lite.rl.agent import critic_kind, estimator_label, load_run
from aepo_lite.rl.oracle import snapshot_q_errors
from aepo_lite.rl.diagnostics import CRITIC_ERRORS_COLUMNS, csv_per_run, raw_q_fn, render_critic_errors


def _key(r: dict) -> tuple:
    return (r["dataset"], r["run"], round(float(r["guidance_scale"]), 9), int(r["episodes"]), int(r["horizon"]),
            round(float(r["gamma"]), 9), round(float(r.get("continuation_noise") or 0), 9), int(r.get("rollouts") or 1))


def _run_rows(run: str, a, rows: list[dict]) -> list[dict]:
    agent, cfg, data = load_run(run)
    try:
        q_fn = raw_q_fn(agent, data)  # a critic in raw reward units
    except ValueError as e:
        raise SystemExit(f"--runs: {run} ({cfg.method}): {e}") from None
    done = {_key(r) for r in rows}
    out = []
    for w in a.scales:
        if (cfg.dataset, run, round(float(w), 9), a.episodes, a.horizon, round(a.gamma, 9),
                round(a.continuation_noise, 9), a.rollouts) in done:
            print(f"skip {run} w={w:g}: in the CSV")
            continue
        g = torch.Generator(device=agent.device).manual_seed(cfg.seed)
        got = snapshot_q_errors(cfg.dataset, q_fn, lambda o: agent.act(o, float(w), generator=g),
                                episodes=a.episodes, probe_every=a.probe_every, horizon=a.horizon, gamma=a.gamma,
                                continuation_noise=a.continuation_noise, rollouts=a.rollouts, progress=True)
        for r in got:
            row = {"dataset": cfg.dataset, "run": run, "label": estimator_label(cfg), "critic": critic_kind(cfg),
                   "seed": cfg.seed, "guidance_scale": w, **r}
            out.append({k: row[k] for k in CRITIC_ERRORS_COLUMNS})  # the CSV's columns (the rows hold more)
            print(f"{run} w={w:g} {r['group']} (continuation noise {a.continuation_noise:g}): exact adv. {r['true_adv']:.2f}, critic {r['critic_adv']:.2f}, sign "
                  f"right {r['sign_agree']:.2f}, corr {r['corr']:.2f}, gain {r['critic_gain']:.2f} of "
                  f"{r['oracle_gain']:.2f} ({r['probes']} states)", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="trained run directories with a critic")
    p.add_argument("--scales", nargs="+", type=float, default=[0.0, 10.0], help="guidance scales of the policy")
    p.add_argument("--episodes", type=int, default=3, help="episodes per run and scale (reset seeds 100000 + i)")
    p.add_argument("--probe-every", type=int, default=20, help="probe every this many steps of an episode")
    p.add_argument("--horizon", type=int, default=300, help="rollout steps of an exact value (the candidate's included)")
    p.add_argument("--gamma", type=float, default=0.99, help="the exact values' discount (the critics': 0.99)")
    p.add_argument("--continuation-noise", type=float, default=0.0,
                   help="action-noise std after the candidate (0: the deterministic snapshot; the data's: its Q)")
    p.add_argument("--rollouts", type=int, default=1, help="noisy continuations averaged per candidate")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    for path in csv_per_run(a.out, a.runs, lambda run, rows: _run_rows(run, a, rows), CRITIC_ERRORS_COLUMNS, render_critic_errors):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
