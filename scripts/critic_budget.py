"""How a critic's ranking of actions grows with its training steps and size, on a dataset made by ``aepo-lite
make-dataset``: the probes of ``scripts/critic_errors.py`` (states a trained run's policy visits at each guidance
scale, candidate actions, their exact values by the simulator) are recorded once; then a critic with the run's
settings, or a variant of them, is trained afresh by the run's own critic stage (its seed, batches and finished
upstream stages) and scored on the probes after each number of steps. Writes a CSV, its Markdown table and a figure
beside it (``aepo-lite figures`` re-renders both from the CSV); probes and critic checkpoints live in ``--work``, so a
killed script resumes at its last finished step count and a rerun skips the rows the CSV has.

    python scripts/critic_budget.py --run runs/s51/big-energy-softmax-hopper/local_hopper_medium-v0/aepo-bench-s5 \
        --steps 10000 20000 40000 80000 160000 --variants run hidden=256,batch=256 expectile=0.5 \
        --out figures/rl_6c_big/critic_budget.csv
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import fields, replace
from pathlib import Path

import torch

from aepo_lite.config import CriticConfig
from aepo_lite.device import seed_everything
from aepo_lite.rl.agent import Agent, build_stages, check_config, critic_kind, load_run
from aepo_lite.rl.oracle import QProbes, probe_q_states, q_error_rows
from aepo_lite.rl.diagnostics import CRITIC_BUDGET_COLUMNS, existing_rows, raw_q_fn, render_critic_budget, \
    write_csv_and_table
from aepo_lite.training import StageStore, run_stage, stage_hash

FIXED = ("steps",)  # the step counts are --steps


def parse_variant(text: str) -> dict:
    """``run`` (the run's critic settings) or ``field=value,...`` of CriticConfig (typed as the field; ``kind=mc``
    trains the Monte-Carlo critic in place of the run's)."""
    if text == "run":
        return {}
    types = {f.name: type(getattr(CriticConfig(), f.name)) for f in fields(CriticConfig)}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in types or key in FIXED:
            raise ValueError(f"--variants: {part!r} is not field=value of a critic field other than "
                             f"{'/'.join(FIXED)} (fields: {sorted(set(types) - set(FIXED))})")
        if types[key] is bool:
            if value not in ("true", "false"):
                raise ValueError(f"--variants: {key} takes true or false, got {value!r}")
            out[key] = value == "true"
        else:
            try:
                out[key] = types[key](value)
            except ValueError:
                raise ValueError(f"--variants: {key} takes a {types[key].__name__}, got {value!r}") from None
    return out


def probes_path(run: str, cfg, w: float, a) -> Path:
    """Where the run's probes at w live in --work (named by the run, its seed, w and the probing arguments)."""
    key = json.dumps([str(Path(run).resolve()), cfg.dataset, cfg.seed, w, a.episodes, a.probe_every, a.horizon,
                      a.gamma])
    return Path(a.work) / f"probes-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def probes_for(run: str, agent, cfg, w: float, a) -> QProbes:
    """The run's probes at w (recorded in --work once; as scripts/critic_errors.py draws them)."""
    path = probes_path(run, cfg, w, a)
    if path.exists():
        return QProbes.load(path)
    g = torch.Generator(device=agent.device).manual_seed(cfg.seed)
    probes = probe_q_states(cfg.dataset, lambda o: agent.act(o, float(w), generator=g), episodes=a.episodes,
                            probe_every=a.probe_every, horizon=a.horizon, gamma=a.gamma, progress=True)
    probes.save(path)
    print(f"recorded {len(probes.obs)} states at w={w:g} in {path}", flush=True)
    return probes


def fresh_critic_stage(vcfg, data):
    """A fresh agent for ``vcfg`` on ``data`` (made under its seed, as train() makes it) and its stages (the
    critic's among them)."""
    seed_everything(vcfg.seed)  # as train() does before the agent's networks are made
    mean, std = data.obs_stats()
    agent = Agent(vcfg, data.state_dim, data.action_dim, mean, std, data.action_low, data.action_high,
                  torch.device("cpu"))
    stages = build_stages(vcfg, agent, data.tensors(torch.device("cpu")), torch.device("cpu"))
    return agent, stages


def variant_stages(run: str, cfg, data, over: dict, steps: int):
    """A fresh agent for the run's config with the critic fields ``over`` and ``steps`` steps; the stages before
    its critic loaded from the run (they must be finished there, unchanged by the variant); the critic stage."""
    try:
        vcfg = check_config(replace(cfg, critic=replace(cfg.critic, **over, steps=steps)))
    except ValueError as e:
        raise SystemExit(f"--variants: {e}") from None
    if vcfg.critic.lr_decay:
        raise SystemExit("--variants: a critic with lr_decay: its learning rate at each count would depend on the "
                         "last count (use lr_decay=false)")
    agent, stages = fresh_critic_stage(vcfg, data)
    store = StageStore(Path(run) / "checkpoints", data=data.fingerprint())
    for st in stages[:[s.name for s in stages].index("critic")]:
        if not store.is_complete(st.name, stage_hash(st)):
            raise SystemExit(f"--run: {run} has no finished {st.name} stage for this critic")
        run_stage(st, store, progress=False)
    return agent, vcfg, next(s for s in stages if s.name == "critic")


def probe_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments this script and scripts/critic_seeds.py share: the run, its probes, --work and --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--run", required=True, help="a trained run with a critic (its states, settings and stages)")
    p.add_argument("--scales", nargs="+", type=float, default=[0.0, 10.0], help="guidance scales of the policy")
    p.add_argument("--episodes", type=int, default=10, help="episodes per scale (reset seeds 100000 + i)")
    p.add_argument("--probe-every", type=int, default=4, help="probe every this many steps of an episode")
    p.add_argument("--horizon", type=int, default=300, help="rollout steps of an exact value (the candidate's included)")
    p.add_argument("--gamma", type=float, default=0.99, help="the exact values' discount (the critics': 0.99)")
    p.add_argument("--work", default="runs/critic_budget", help="probes, critic checkpoints (resumable)")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table and .png figure beside it)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (these small critics train fastest on "
                   "one; run a second script on another core)")
    return p


def parse_checked(p: argparse.ArgumentParser, argv):
    """``p``'s arguments, --out checked to be a CSV path."""
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    if a.threads < 1:
        p.error(f"--threads: expected 1 or more, got {a.threads}")
    torch.set_num_threads(a.threads)
    return a


def check_step_counts(p: argparse.ArgumentParser, steps) -> None:
    """--steps: increasing positive step counts (each a point the critic is scored at)."""
    if any(s < 1 for s in steps) or steps != sorted(set(steps)):
        p.error(f"--steps: expected increasing positive step counts, got {steps}")


def load_critic_run(run: str):
    """``load_run``'s (agent, config, data) on the CPU, its critic checked to give Q in raw reward units before
    any probing (a named exit otherwise)."""
    agent, cfg, data = load_run(run, device="cpu")
    try:
        raw_q_fn(agent, data)
    except ValueError as e:
        raise SystemExit(f"--run: {run} ({cfg.method}): {e}") from None
    return agent, cfg, data


def main(argv=None) -> int:
    p = probe_arguments(__doc__.splitlines()[0])
    p.add_argument("--steps", nargs="+", type=int, default=[10_000, 20_000, 40_000, 80_000],
                   help="critic training steps at which it is scored (increasing)")
    p.add_argument("--variants", nargs="+", default=["run"],
                   help="'run' (the run's critic settings) or field=value,... changes of them, e.g. hidden=256,batch=256")
    a = parse_checked(p, argv)
    check_step_counts(p, a.steps)
    try:
        variants = {v: parse_variant(v) for v in a.variants}
    except ValueError as e:
        p.error(str(e))
    agent, cfg, data = load_critic_run(a.run)
    probes = {w: probes_for(a.run, agent, cfg, w, a) for w in a.scales}
    rows = existing_rows(a.out)
    for name, over in variants.items():
        rows = train_and_score(a, name, over, cfg, data, probes, rows)
    print(f"wrote {a.out}")
    return 0


def train_and_score(a, name: str, over: dict, cfg, data, probes: dict, rows: list[dict], *, make=None,
                    extra: dict | None = None, columns=CRITIC_BUDGET_COLUMNS,
                    render=render_critic_budget) -> list[dict]:
    """One variant: its critic stage trained to the last step count (checkpoints in --work, at every count's
    greatest common divisor, so a killed run resumes there), scored at each count its rows lack.

    ``make(steps) -> (agent, vcfg, stage, data)`` builds the variant's critic stage (default: the run's critic
    with the fields ``over``, on the run's data); ``extra`` adds columns to its rows (``columns``, rendered by
    ``render``; scripts/critic_data.py's)."""
    def key(run, variant, steps, w, episodes, horizon, gamma):
        return run, variant, int(steps), round(float(w), 9), int(episodes), int(horizon), round(float(gamma), 9)
    done = {key(r["run"], r["variant"], r["steps"], r["guidance_scale"], r["episodes"], r["horizon"], r["gamma"])
            for r in rows}

    def missing(steps):
        return [w for w in a.scales if key(a.run, name, steps, w, a.episodes, a.horizon, a.gamma) not in done]
    if not any(missing(s) for s in a.steps):
        print(f"skip {name}: every step count in the CSV")
        return rows
    if make is None:
        agent, vcfg, stage = variant_stages(a.run, cfg, data, over, max(a.steps))
    else:
        agent, vcfg, stage, data = make(max(a.steps))
    store = StageStore(Path(a.work) / "critics", keyed=True, data=data.fingerprint())
    ck = store.load("critic", stage_hash(stage))
    count = {"done": 0 if ck is None else ck["step"]}
    lost = [s for s in a.steps if s < count["done"] and missing(s)]
    if lost:
        raise SystemExit(f"--out: lacks the rows of {name} at {lost} steps, which its checkpoint in --work is past; "
                         f"delete {store.path('critic', stage_hash(stage))} to train it again")

    def score(steps):
        todo = missing(steps)
        if not todo:
            return
        for w in todo:
            for r in q_error_rows(probes[w], raw_q_fn(agent, data)):
                row = {"dataset": cfg.dataset, "run": a.run, "critic": critic_kind(vcfg), "variant": name,
                       "seed": cfg.seed, "steps": steps, "guidance_scale": w, **(extra or {}), **r}
                rows.append({k: row[k] for k in columns})
                print(f"{name} {steps} steps w={w:g} {r['group']}: sign right {r['sign_agree']:.2f}, corr "
                      f"{r['corr']:.2f}, gain {r['critic_gain']:.3f} of {r['oracle_gain']:.3f}", flush=True)
            done.add(key(a.run, name, steps, w, a.episodes, a.horizon, a.gamma))
        write_csv_and_table(a.out, rows, columns, render)

    def before_step():  # called before each step: count["done"] steps are behind the critic
        if count["done"] in a.steps:
            score(count["done"])
        count["done"] += 1
    run_stage(stage, store, checkpoint_every=math.gcd(*a.steps), log_every=max(a.steps), before_step=before_step)
    score(max(a.steps))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
