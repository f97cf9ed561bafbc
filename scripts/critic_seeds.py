"""Do critics that differ only in their seed err alike? On a dataset made by ``aepo-lite make-dataset``: the probes
of ``scripts/critic_budget.py`` (states a trained run's policy visits at each guidance scale, candidate actions,
their exact values by the simulator; shared with it through ``--work``), then the run's critic stage trained
``--members`` times, member m with the stage's seed + m (its networks' initialisation and its batches; member 0 is
the run's own critic), each scored on the probes; the rows (:func:`aepo_lite.rl.diagnostics.critic_seed_rows`):
how well the members agree with each other and with the exact values, and the mean of 1, 2, 4, ... of them taken
as one critic (an ensemble). Writes a CSV, its Markdown table and a figure beside it (``aepo-lite figures``
re-renders both from the CSV). Each member's checkpoints and Q on the probes live in ``--work``: a killed script
resumes at its last finished member; a rerun skips what the CSV has.

    python scripts/critic_seeds.py --run runs/s51/big-energy-softmax-hopper/local_hopper_medium-v0/aepo-bench-s5 \
        --members 8 --out figures/rl_6c_big/critic_seeds.csv
"""
from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # critic_budget.py, the probes and stages shared with it
from critic_budget import (load_critic_run, parse_checked, probe_arguments, probes_for, probes_path,  # noqa: E402
                           variant_stages)

from aepo_lite._io import atomic_save_npz  # noqa: E402
from aepo_lite.core.critics import make_critic  # noqa: E402
from aepo_lite.rl.agent import critic_kind  # noqa: E402
from aepo_lite.rl.diagnostics import CRITIC_SEEDS_COLUMNS, critic_seed_rows, existing_rows, raw_q_fn, \
    render_critic_seeds, write_csv_and_table  # noqa: E402
from aepo_lite.training import StageStore, run_stage, stage_hash  # noqa: E402


def main(argv=None) -> int:
    p = probe_arguments(__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=8, help="critics trained, each with its own seed (>= 2)")
    p.add_argument("--steps", type=int, default=None, help="each critic's training steps (default: the run's)")
    a = parse_checked(p, argv)
    if a.members < 2:
        p.error(f"--members: expected 2 or more critics to compare, got {a.members}")
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps: expected a positive step count, got {a.steps}")
    agent, cfg, data = load_critic_run(a.run)
    steps = a.steps or cfg.critic.steps
    rows = existing_rows(a.out)

    def key(run, steps, w, episodes, horizon, gamma, members):
        return run, int(steps), round(float(w), 9), int(episodes), int(horizon), round(float(gamma), 9), int(members)
    done = {key(r["run"], r["steps"], r["guidance_scale"], r["episodes"], r["horizon"], r["gamma"], r["members"])
            for r in rows}
    todo = [w for w in a.scales if key(a.run, steps, w, a.episodes, a.horizon, a.gamma, a.members) not in done]
    if not todo:
        print(f"skip: {a.out} has every scale's rows")
        return 0
    probes = {w: probes_for(a.run, agent, cfg, w, a) for w in todo}
    q_hats = [member_q(a, cfg, data, steps, m, probes) for m in range(a.members)]
    for w in todo:
        for r in critic_seed_rows(probes[w], [q[w] for q in q_hats]):
            row = {"dataset": cfg.dataset, "run": a.run, "critic": critic_kind(cfg), "steps": steps,
                   "guidance_scale": w, **r}
            rows.append({k: row[k] for k in CRITIC_SEEDS_COLUMNS})
            print(f"w={w:g} {r['group']}, mean of {r['members']}: corr {r['corr']:.2f} (critics agree "
                  f"{r['agree']:.2f}, each alone {r['alone']:.2f}), sign right {r['sign_agree']:.2f}, gain "
                  f"{r['critic_gain']:.3f} of {r['oracle_gain']:.3f}", flush=True)
    write_csv_and_table(a.out, rows, CRITIC_SEEDS_COLUMNS, render_critic_seeds)
    print(f"wrote {a.out}")
    return 0


def member_q(a, cfg, data, steps: int, m: int, probes: dict) -> dict:
    """Member m's Q on each scale's probes ({w: (P * C,)}), from --work, or its critic trained (resumably) first.
    Member 0 is the run's critic stage as it is (loaded from the run when it finished there at these steps); member
    m > 0 the same stage with seed + m, its critic made afresh under that seed."""
    agent, vcfg, stage = variant_stages(a.run, cfg, data, {}, steps)
    if m:
        stage = replace(stage, seed=stage.seed + m, learner=partial(_fresh_critic, agent, vcfg, data))
    h = stage_hash(stage)
    path = Path(a.work) / f"seedq-{h}.npz"
    names = {w: probes_path(a.run, cfg, w, a).stem for w in probes}
    held = {}
    if path.exists():
        with np.load(path) as f:
            held = {n: f[n] for n in f.files}
        if all(n in held for n in names.values()):
            return {w: held[n] for w, n in names.items()}
    own = StageStore(Path(a.run) / "checkpoints", data=data.fingerprint())
    store = own if m == 0 and own.is_complete("critic", h) else StageStore(Path(a.work) / "critics", keyed=True,
                                                                           data=own.data)
    print(f"member {m}: critic stage {h} ({steps} steps)", flush=True)
    run_stage(stage, store, checkpoint_every=min(10_000, steps), log_every=steps)
    q = raw_q_fn(agent, data)
    out = {}
    for w, pr in probes.items():
        P, C, d = pr.actions.shape
        out[w] = q(np.repeat(pr.obs, C, 0), pr.actions.reshape(P * C, d))
    atomic_save_npz(path, **held, **{names[w]: v for w, v in out.items()})
    return out


def _fresh_critic(agent, vcfg, data):
    """A critic made afresh (under the seed run_stage has just set), put in the agent: what member m > 0 trains."""
    agent.critic = make_critic(data.state_dim, data.action_dim, replace(vcfg.critic, kind=critic_kind(vcfg)))
    return agent.critic


if __name__ == "__main__":
    raise SystemExit(main())
