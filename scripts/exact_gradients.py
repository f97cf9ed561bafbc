"""How the exact value changes with the action, state by state, on a dataset made by ``aepo-lite make-dataset``: the
exact values that ``scripts/critic_data.py --critic-kind exact --extra-actions K`` computes and keeps in ``--work``
(each state of the first n episodes of its fixed random order, with its data action and K more, run in the
simulator), read back (or computed, the same way and into the same cache) and summarised by
``aepo_lite.rl.diagnostics.action_gradient_field``: how much of each state's value differences a plane in the action
explains, and how the plane's slope (the direction the value rises in) changes from one state to the next. Writes a
CSV and its Markdown table beside it (``aepo-lite figures`` re-renders the table); a rerun skips the rows it has.

    python scripts/exact_gradients.py --dataset local/hopper-800k/medium-v0 --train-episodes 41 --extra-actions 4 \
        --out figures/rl_6c_big/exact_gradients.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # critic_data.py: the exact values and their caches
from critic_data import DEFAULT_SCALES, ORDER_SEED, continuation, state_actions  # noqa: E402

from aepo_lite.rl.data import description_info, load_minari  # noqa: E402
from aepo_lite.rl.oracle import exact_q_labels  # noqa: E402
from aepo_lite.rl.diagnostics import (ACTION_GRADIENT_COLUMNS, action_gradient_field, existing_rows,  # noqa: E402
                                      render_action_gradients, write_csv_and_table)


SENSITIVITY_STATES, SENSITIVITY_STEP = 64, 1e-6


def sensitivity(a, full, sub) -> float:
    """How well posed the exact values are: the mean |Q(s, a + 1e-6 z) - Q(s, a)| over 64 states of ``sub``
    (evenly spaced; a = the data's action, z ~ N(0, I)), recomputed here (not cached). Near 0 where the deterministic
    continuation's return is a smooth function of the action; large where the closed loop is chaotic, so that an
    exact value of this kind carries no usable action signal."""
    at = np.linspace(0, sub.n - 1, min(SENSITIVITY_STATES, sub.n)).astype(int)
    lo, hi = full.action_low, full.action_high
    obs, act = sub.obs_rows[sub.idx][at], full.to_action_box(sub.actions[at])
    moved = np.clip(act + SENSITIVITY_STEP * np.random.default_rng(0).standard_normal(act.shape), lo, hi)
    q = exact_q_labels(a.dataset, np.concatenate([obs, obs]), np.concatenate([act, moved]), horizon=a.horizon,
                       gamma=a.gamma, **continuation(a)[0])
    return float(np.abs(q[len(at):] - q[:len(at)]).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a dataset made by aepo-lite make-dataset with action noise")
    p.add_argument("--train-episodes", type=int, required=True, help="the first n episodes of the fixed order")
    p.add_argument("--extra-actions", type=int, default=4, help="K more actions a state (at least the action "
                   "dimension + 1, for a plane with a residual)")
    p.add_argument("--extra-scales", nargs="+", type=float, default=DEFAULT_SCALES,
                   help="the extra actions' noise multiples, cycled over them (critic_data.py's: 1 and 3); one "
                        "value measures the planes at that spread alone")
    p.add_argument("--horizon", type=int, default=300, help="rollout steps of an exact value (critic_data.py's)")
    p.add_argument("--gamma", type=float, default=0.99, help="the exact values' discount (critic_data.py's)")
    p.add_argument("--continuation-draws", type=int, default=0,
                   help="0 (default): the deterministic snapshot after the action; M (even): the data's own policy "
                        "after it (the snapshot plus the data's action noise), the mean of M noise sequences shared by "
                        "every action (M x the time), and the slopes of its two halves compared (cos halves)")
    p.add_argument("--work", default="runs/critic_budget", help="the exact values' caches (critic_data.py's)")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    if not all(np.isfinite(c) and c > 0 for c in a.extra_scales):
        p.error(f"--extra-scales: expected positive noise multiples, got {a.extra_scales}")
    if a.continuation_draws < 0 or a.continuation_draws % 2:
        p.error(f"--continuation-draws: expected 0 or an even number of noise sequences (two halves), got "
                f"{a.continuation_draws}")
    if a.train_episodes < 1 or a.extra_actions < 1:
        p.error(f"--train-episodes/--extra-actions: expected 1 or more, got {a.train_episodes} and {a.extra_actions}")
    try:
        full = load_minari(a.dataset, reward_scaling="none")[0]
    except ValueError as e:
        raise SystemExit(f"--dataset: {e}") from None
    if a.extra_actions < full.action_dim + 1:
        p.error(f"--extra-actions: a plane in {full.action_dim} action dimensions needs {full.action_dim + 1} or more "
                f"extra actions, got {a.extra_actions}")
    if a.train_episodes > full.n_episodes:
        p.error(f"--train-episodes: {a.dataset} has {full.n_episodes} episodes, fewer than {a.train_episodes}")
    noise = float(description_info(full.metadata).get("recipe", {}).get("collect_noise", 0.0))
    if not noise > 0:
        p.error(f"--dataset: {a.dataset} was collected without action noise: no spread to draw the actions with")
    rows = existing_rows(a.out)
    scales = " ".join(f"{c:g}" for c in a.extra_scales)
    key = (a.dataset, a.train_episodes, a.extra_actions + 1, scales, a.horizon, round(a.gamma, 9), a.continuation_draws)
    if any((r["dataset"], int(r["train_episodes"]), int(r["actions"]), r["scales"], int(r["horizon"]),
            round(float(r["gamma"]), 9), int(r.get("draws") or 0)) == key for r in rows):
        print(f"skip {a.dataset}: {a.train_episodes} episodes, {a.continuation_draws} draws in {a.out}")
        return 0
    episodes = np.sort(np.random.default_rng(ORDER_SEED).permutation(full.n_episodes)[:a.train_episodes])
    sub = full.take_episodes(episodes)
    def values_with(c):  # the values of the states' actions with continuation c (None: the deterministic one)
        a.continuation = c
        return state_actions(a, a.dataset, full, episodes, noise)
    obs, actions, values = values_with(None)
    halves, reference, m = None, None, a.continuation_draws // 2
    if m:  # the two halves' values (each its own cache), their mean measured against the deterministic ones
        halves, reference = [values_with((noise, m, first))[2] for first in (0, m)], values
        values, a.continuation = (halves[0] + halves[1]) / 2, (noise, m, 0)  # the sensitivity's: the first half's
    episode_of = np.cumsum(np.r_[True, sub.next_idx[:-1] != sub.idx[1:]]) - 1  # a new episode where rows jump
    stats = action_gradient_field(obs, actions, values, episode_of, halves=halves, reference=reference)
    rows.append({"dataset": a.dataset, "train_episodes": a.train_episodes, "scales": scales, "horizon": a.horizon,
                 "gamma": a.gamma, "draws": a.continuation_draws, **stats, "sensitivity": sensitivity(a, full, sub)})
    print(", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
    write_csv_and_table(a.out, rows, ACTION_GRADIENT_COLUMNS, render_action_gradients)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
