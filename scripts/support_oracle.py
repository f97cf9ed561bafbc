"""The best of N of a made dataset's own actions, chosen by Monte-Carlo rollouts of the true environment
(aepo_lite.rl.oracle.snapshot_oracle_scores): how much one step of in-support policy improvement can gain
there, for a critic that ranked the support as well as the rollouts do; with ``--search sequence``, a search over
whole trajectories of the data's policy, replanned at every step (several steps of in-support improvement). Writes a CSV and its Markdown table
beside it (``aepo-lite figures`` re-renders the table from the CSV alone); a rerun skips the rows the CSV has.

    python scripts/support_oracle.py --datasets local/hopper/medium-v0 --candidates 4 16 64 \
        --out figures/rl_6c_ln/support_oracle.csv
    python scripts/support_oracle.py --datasets local/hopper/medium-v0 --search sequence --candidates 4 16 64 \
        --episodes 10 --out figures/rl_6c_ln/support_oracle.csv

Long rows can be split across processes by episode (each episode draws from its own generator, so the parts
joined are the row one process would have written): ``--workers W`` runs a row's episodes in W processes side by
side, each episode's part added to ``--out`` as it lands and joined there into the row; or by hand, each part into
its own CSV (on other machines, say), then added to the main one:

    python scripts/support_oracle.py ... --episodes 1 --first-episode 0 --out part0.csv   # one process
    python scripts/support_oracle.py ... --episodes 1 --first-episode 1 --out part1.csv   # another
    python scripts/support_oracle.py --add part0.csv part1.csv --out figures/rl_6c_ln/support_oracle.csv

Each episode is saved after every step (``--resume-dir``, by default a hidden folder beside ``--out``), so a killed
run, started again with the same arguments, resumes at the step it reached; the row's seconds count the search
time of every run that took its steps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aepo_lite.rl.oracle import snapshot_oracle_parts, snapshot_oracle_scores
from aepo_lite.rl.diagnostics import (SUPPORT_ORACLE_COLUMNS, existing_rows, join_oracle_parts, oracle_episodes,
                                      oracle_settings, render_support_oracle, write_csv_and_table)


def _held(rows, settings: tuple, episodes: range) -> bool:
    """Whether one of ``rows`` of these settings already holds every one of ``episodes``."""
    return any(oracle_settings(r) == settings and episodes.start >= oracle_episodes(r).start
               and episodes.stop <= oracle_episodes(r).stop for r in rows)


def _add(rows, paths) -> list[dict]:
    """``rows`` plus the rows of the CSVs ``paths`` (parts measured by other processes) that ``rows`` do not
    hold yet."""
    for path in paths:
        for r in existing_rows(path):
            if not _held(rows, oracle_settings(r), oracle_episodes(r)):
                rows.append(r)
    return rows


def _measure(rows, d: str, a, n: int, episodes: range, settings: tuple, kw: dict) -> list[dict]:
    """``rows`` with the row of dataset ``d``, N = ``n`` over ``episodes`` measured (in ``a.workers`` processes: one
    part an episode, those already in ``rows`` skipped) and joined, ``a.out`` written as each row or part lands."""
    def land(r):
        nonlocal rows
        r["episode_scores"] = " ".join(f"{v:.6f}" for v in r["episode_scores"])
        rows = join_oracle_parts(rows + [{"dataset": d, "snapshot": a.which, **r}])
        write_csv_and_table(a.out, rows, SUPPORT_ORACLE_COLUMNS, render_support_oracle)

    if a.workers == 1:
        (r,) = snapshot_oracle_scores(d, (n,), episodes=a.episodes, progress=True, first_episode=a.first_episode, **kw)
        land(r)
    else:
        left = [i for i in episodes if not _held(rows, settings, range(i, i + 1))]
        snapshot_oracle_parts(d, n, left, a.workers, land, **kw)
    return rows


def _data_noise(name: str) -> float:
    """The action-noise std a ``make-dataset`` dataset was collected with (its recipe's ``collect_noise``)."""
    import minari
    from aepo_lite.rl.data import description_info
    info = description_info(minari.load_dataset(name).storage.metadata)
    if "recipe" not in info:
        raise SystemExit(f"--datasets: {name} was not made by aepo-lite make-dataset (its description has no recipe)")
    return float(info["recipe"]["collect_noise"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=[], help="datasets made by aepo-lite make-dataset")
    p.add_argument("--candidates", nargs="+", type=int, default=[1, 4, 16], help="N: actions compared per step")
    p.add_argument("--horizon", type=int, default=1000, help="rollout steps per candidate (the candidate's included)")
    p.add_argument("--episodes", type=int, default=5, help="episodes per N (reset seeds 100000 + i)")
    p.add_argument("--first-episode", type=int, default=0,
                   help="the first episode's index i (a part of a row measured in several processes)")
    p.add_argument("--add", nargs="+", default=[], metavar="CSV",
                   help="CSVs of parts (or rows) written by other runs of this script: their rows not yet in --out "
                        "are added, and parts holding episodes 0 to n - 1 are joined into one row")
    p.add_argument("--noise", type=float, default=None, help="action-noise std (default: the data's own)")
    p.add_argument("--continuation-noise", type=float, default=0.0,
                   help="the rollouts' action-noise std after the candidate (0: the snapshot's exact Q)")
    p.add_argument("--continuation-draws", type=int, default=1,
                   help="with --continuation-noise: score each candidate by the mean of M rollouts (the data policy's "
                        "own Q; M x the time)")
    p.add_argument("--gamma", type=float, default=1.0, help="the rollouts' discount")
    p.add_argument("--search", default="step", choices=("step", "sequence"),
                   help="step: the best first action, then the snapshot; sequence: the best whole trajectory of the "
                        "data's policy, replanned each step (continuation noise: the candidates' noise)")
    p.add_argument("--which", default="medium", choices=("medium", "expert"), help="the recipe's snapshot")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes side by side, each measuring one episode at a time (each holds N x draws "
                        "simulators: about 1.2 MB each for Hopper)")
    p.add_argument("--resume-dir", default=None,
                   help="where each episode is saved after every step, for a killed run to resume (default: "
                        ".<out's name>.steps beside --out)")
    a = p.parse_args(argv)
    if not a.datasets and not a.add:
        p.error("--datasets: expected at least one dataset (or --add CSV ... alone, to join parts)")
    if a.workers < 1:
        p.error(f"--workers: expected at least 1 process, got {a.workers}")
    if a.first_episode < 0:
        p.error(f"--first-episode: expected an episode index >= 0, got {a.first_episode}")
    if a.search == "sequence" and a.continuation_noise != 0:
        p.error("--continuation-noise: the sequence search draws every step with --noise; leave it out")
    if a.continuation_draws < 1 or (a.continuation_draws > 1 and (a.continuation_noise == 0 or a.search != "step")):
        p.error(f"--continuation-draws: expected 1, or more with --continuation-noise > 0 and the step search; got "
                f"{a.continuation_draws}")
    for path in a.add:
        if not (path.endswith(".csv") and Path(path).is_file()):
            p.error(f"--add: expected CSVs written by this script, got {path!r}")
    try:
        rows = join_oracle_parts(_add(existing_rows(a.out), a.add))
    except ValueError as e:
        p.error(f"--{e}")
    steps = Path(a.resume_dir) if a.resume_dir else Path(a.out).with_name(f".{Path(a.out).stem}.steps")
    for d in a.datasets:
        noise = _data_noise(d) if a.noise is None else a.noise
        cont = noise if a.search == "sequence" else a.continuation_noise
        for n in a.candidates:
            settings = (d, a.which, a.search, n, a.horizon, round(noise, 9), round(cont, 9), round(a.gamma, 9),
                        a.continuation_draws)
            episodes = range(a.first_episode, a.first_episode + a.episodes)
            if _held(rows, settings, episodes):
                print(f"skip {d} {a.search} N={n} horizon={a.horizon} episodes {episodes.start}-{episodes.stop - 1}: "
                      f"in {a.out}")
                continue
            kw = dict(horizon=a.horizon, noise=noise, continuation_noise=0.0 if a.search == "sequence" else cont,
                      gamma=a.gamma, search=a.search, continuation_draws=a.continuation_draws, which=a.which,
                      resume_dir=steps)
            rows = _measure(rows, d, a, n, episodes, settings, kw)
            for r in [r for r in rows if _held([r], settings, episodes)][:1]:  # none while parts stay apart
                print(f"{d} {a.search} N={n} horizon={a.horizon} gamma={a.gamma:g} continuation noise={cont:g} x "
                      f"{a.continuation_draws}: score {float(r['score_mean']):.1f} +- {float(r['score_std']):.1f} "
                      f"({float(r['seconds']):.0f} s)", flush=True)
    for path in write_csv_and_table(a.out, rows, SUPPORT_ORACLE_COLUMNS, render_support_oracle):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
