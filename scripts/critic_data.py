"""How a critic's ranking of actions grows with its data, on datasets made by ``aepo-lite make-dataset``: the probes of
``scripts/critic_budget.py`` (states a trained run's policy visits at each guidance scale, candidate actions, their
exact values by the simulator; shared with it through ``--work``), then a critic with the run's settings and seed
(or another ``--critic-kind``) trained afresh on the first n episodes (``--train-episodes``) of a fixed random order
of ``--dataset``'s episodes (the run's dataset, or a larger one of the same recipe but its size: the same data
policy; with ``--other-noise`` also one collected with another action-noise std around the same snapshot) and scored
after each number of steps. The subsets are nested, so more data only adds episodes. Writes a CSV, its Markdown
table and a figure beside it (``aepo-lite figures`` re-renders both from the CSV); critic checkpoints live in
``--work``, so a killed script resumes; a rerun skips the rows the CSV has.

``--critic-kind exact`` asks what the critic's network can learn from these transitions when its targets carry no
error: the Monte-Carlo critic regressed, in place of each transition's noisy return, on the exact value of its
(state, action) as the probes define it (``aepo_lite.rl.oracle.exact_q_labels``: the simulator rebuilt from the
observation, the action, then the deterministic snapshot for ``--horizon`` steps, discounted by ``--gamma``). The
labels are computed once per episode and kept in ``--work``. With ``--extra-actions K`` it also sees K more actions
at each state (the data's action plus 1 or 3 noise stds of noise) with their exact values: not offline data, but
whether the network ranks actions once it is shown several at a state. ``--within-weight L`` (with
``--extra-actions``) changes its loss: batches hold the 1 + K actions of each state drawn together, and L times the
squared error of the values centered within each state (an advantage fitted on within-state differences) is added to
the regression, so the value differences between a state's actions are what the fit is scored on. With extra
actions the script also writes ``<out>_fit.csv``: how well the trained critic orders the actions of its own training
states and of ``--fit-episodes`` held-out episodes (the next ones of the same order, their extra actions computed
alike), which tells a fit that failed from one that does not carry to other states.

    aepo-lite make-dataset --env Hopper-v5 --quality medium --steps 800000 --name local/hopper-800k/medium-v0
    python scripts/critic_data.py --run runs/s51/big-energy-softmax-hopper/local_hopper_medium-v0/aepo-bench-s5 \
        --dataset local/hopper-800k/medium-v0 --train-episodes 205 411 822 1644 3288 6575 --steps 20000 40000 80000 \
        --out figures/rl_6c_big/critic_data.csv
    python scripts/critic_data.py --run ... --dataset local/hopper-800k/medium-v0 --train-episodes 205 411 \
        --critic-kind exact --out figures/rl_6c_big/critic_data.csv
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # critic_budget.py, the probes and stages shared with it
from critic_budget import (check_step_counts, fresh_critic_stage, load_critic_run, parse_checked,  # noqa: E402
                           parse_variant, probe_arguments, probes_for, train_and_score)

from aepo_lite._io import atomic_save_npz  # noqa: E402
from aepo_lite.core.critics import MCCritic  # noqa: E402
from aepo_lite.rl.agent import check_config, critic_kind  # noqa: E402
from aepo_lite.rl.data import description_info, load_minari  # noqa: E402
from aepo_lite.rl.oracle import exact_q_labels  # noqa: E402
from aepo_lite.rl.diagnostics import (CRITIC_DATA_COLUMNS, CRITIC_FIT_COLUMNS, existing_rows, raw_q_fn,  # noqa: E402
                                      render_critic_data, render_critic_fit, write_csv_and_table)
from aepo_lite.training.stages import StageStore, run_stage, stage_hash  # noqa: E402

ORDER_SEED = 0  # the fixed random order of the dataset's episodes that the subsets take a prefix of
DEFAULT_SCALES = [1.0, 3.0]  # --extra-actions' noise multiples, cycled: the probes' two spreads


def same_data_policy(run_data, data, ignore=()) -> list[str]:
    """The recipe fields (``make-dataset``'s) in which ``data`` differs from the run's dataset, its size, name and
    the fields ``ignore`` aside: empty when both were collected by the same data policy."""
    mine, theirs = (description_info(d.metadata).get("recipe") for d in (run_data, data))
    if not mine or not theirs:
        return ["recipe (not both made by aepo-lite make-dataset)"]
    skip = ("steps", "name", *ignore)
    return sorted(k for k in set(mine) | set(theirs) if k not in skip and mine.get(k) != theirs.get(k))


def _per_episode(a, stem: str, key: list, full, episodes, fields: str, compute, what: str, chunk: int = 20) -> list:
    """Arrays computed per episode of ``full`` and kept in ``--work/{stem}-<hash of key>.npz`` as ``<field><episode>``
    (``fields``: one letter a field). The episodes the file lacks are computed ``chunk`` at a time,
    ``compute([(e, the episode's data), ...]) -> [{field: array}, ...]``, and the file saved after every chunk (a
    killed script loses at most one). Returns the ``episodes``' arrays concatenated in that order, one per field."""
    path = Path(a.work) / f"{stem}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.npz"
    cache = dict(np.load(path)) if path.exists() else {}
    todo = [int(e) for e in episodes if f"{fields[-1]}{e}" not in cache]
    raw = replace(full, reward_scaling="none")  # one episode at a time: no return span to scale by
    for i in range(0, len(todo), chunk):
        part = [(e, raw.take_episodes(np.array([e]))) for e in todo[i:i + chunk]]
        for (e, _), arrays in zip(part, compute(part)):
            cache.update({f"{f}{e}": arrays[f] for f in fields})
        Path(a.work).mkdir(parents=True, exist_ok=True)
        atomic_save_npz(path, **cache)
        print(f"{what}: {min(i + chunk, len(todo))} of {len(todo)} episodes", flush=True)
    return [np.concatenate([cache[f"{f}{int(e)}"] for e in episodes]) for f in fields]


def continuation(a) -> tuple[dict, list]:
    """``exact_q_labels``' continuation keywords from ``a.continuation`` (None: the deterministic snapshot; or (noise
    std, draws, first draw)) and what they add to a cache key (nothing for the deterministic one: older keys kept)."""
    c = getattr(a, "continuation", None)
    if not c:
        return {}, []
    noise, draws, first = c
    return (dict(continuation_noise=float(noise), draws=int(draws), first_draw=int(first)),
            [["continuation", float(noise), int(draws), int(first)]])


def exact_labels(a, name: str, full, episodes) -> np.ndarray:
    """The exact values (raw reward units) of the transitions of ``full``'s ``episodes`` (in that order), each
    episode's computed once and kept in ``--work``."""
    kw, more = continuation(a)

    def compute(part):
        obs = np.concatenate([d.obs_rows[d.idx] for _, d in part])
        act = np.concatenate([d.to_action_box(d.actions) for _, d in part])  # the environment's units
        q = exact_q_labels(name, obs, act, horizon=a.horizon, gamma=a.gamma, **kw)
        return [{"e": piece} for piece in np.split(q, np.cumsum([d.n for _, d in part])[:-1])]
    (labels,) = _per_episode(a, "exact-labels", [name, a.horizon, a.gamma] + more, full, episodes, "e", compute,
                             "exact values")
    return labels


def extra_actions(a, name: str, full, episodes, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``--extra-actions`` K more actions at each state of ``full``'s ``episodes``, the transition's own action plus
    c x ``noise`` x N(0, I) (c cycling through ``a.extra_scales``, default 1 and 3: 1 for the even ones, 3 for the
    odd; clipped to the box; drawn from the episode's own seed), and their exact values: ((n, K, d) actions in
    [-1, 1], (n, K) values in raw units), kept per episode in ``--work`` as :func:`exact_labels` keeps its own."""
    K, lo, hi = a.extra_actions, full.action_low, full.action_high
    scales = [float(x) for x in (getattr(a, "extra_scales", None) or DEFAULT_SCALES)]
    c = np.array([scales[k % len(scales)] for k in range(K)])[None, :, None]
    kw, more = continuation(a)

    def compute(part):
        acts = []
        for e, d in part:
            own = d.to_action_box(d.actions)
            z = np.random.default_rng([ORDER_SEED, e]).standard_normal((d.n, K, own.shape[1]))
            acts.append(np.clip(own[:, None] + c * noise * z, lo, hi))
        obs = np.concatenate([np.repeat(d.obs_rows[d.idx], K, 0) for _, d in part])
        q = exact_q_labels(name, obs, np.concatenate(acts).reshape(len(obs), -1), horizon=a.horizon, gamma=a.gamma,
                           **kw)
        pieces = np.split(q, np.cumsum([d.n * K for _, d in part])[:-1])
        return [{"a": 2 * (act - lo) / (hi - lo) - 1, "q": piece.reshape(d.n, K)}
                for (_, d), act, piece in zip(part, acts, pieces)]
    key = [name, a.horizon, a.gamma, K, noise] + ([scales] if scales != DEFAULT_SCALES else []) + more  # older kept
    acts, values = _per_episode(a, "exact-extra", key, full, episodes, "aq", compute,
                                f"exact values of {K} more actions a state")
    return acts, values


class WithinStateCritic(MCCritic):
    """The mc critic whose Q loss adds ``weight`` x the squared error of the values centered within each state:
    its batches hold ``group`` consecutive (state, action) pairs at each state (``--within-weight``)."""

    def __init__(self, state_dim: int, action_dim: int, cfg, group: int, weight: float):
        super().__init__(state_dim, action_dim, cfg)
        self.group, self.weight = group, weight

    def _q_loss(self, q1, q2, y):
        def centered(x):
            x = x.reshape(-1, self.group)
            return x - x.mean(1, keepdim=True)
        yc = centered(y)
        return super()._q_loss(q1, q2, y) + self.weight * sum(((centered(q) - yc) ** 2).mean() for q in (q1, q2))


def exact_target_stage(stage, data, labels: np.ndarray, batch: int, a, extra=None):
    """The Monte-Carlo critic's ``stage`` regressed on ``labels`` (raw units, one per transition of ``data``,
    scaled as its rewards are) in place of the returns to go, and with ``extra`` = (actions (n, K, d), values (n, K))
    also on K more actions at each transition's state (batches drawn from all (state, action) pairs alike; with
    ``a.within_weight`` > 0, batches of batch // (1 + K) states with all their actions, for
    :class:`WithinStateCritic`); its config names the targets (its own checkpoints)."""
    T = data.tensors(torch.device("cpu"))
    rows, acts, values = T["idx"], T["a"], torch.as_tensor(labels, dtype=torch.float32)
    factor = data.reward_factor()
    targets = {"horizon": a.horizon, "gamma": a.gamma, **({"extra_actions": a.extra_actions} if extra is not None else {})}
    if extra is not None and a.within_weight > 0:
        K, d = extra[0].shape[1], acts.shape[1]
        group_a = torch.cat([acts[:, None], torch.as_tensor(extra[0], dtype=torch.float32)], 1)  # (n, 1 + K, d)
        group_g = torch.cat([values[:, None], torch.as_tensor(extra[1], dtype=torch.float32)], 1) * factor
        states = max(1, batch // (K + 1))

        def grouped(gen):
            i = torch.randint(0, len(rows), (states,), generator=gen)
            return {"s": T["obs"][rows[i]].repeat_interleave(K + 1, 0), "a": group_a[i].reshape(-1, d),
                    "g": group_g[i].reshape(-1)}
        targets["within_weight"] = a.within_weight
        return replace(stage, config={**stage.config, "targets": {"exact": targets}}, batches=grouped)
    if extra is not None:
        K = extra[0].shape[1]
        rows = torch.cat([rows, rows.repeat_interleave(K)])
        acts = torch.cat([acts, torch.as_tensor(extra[0].reshape(-1, acts.shape[1]), dtype=torch.float32)])
        values = torch.cat([values, torch.as_tensor(extra[1].reshape(-1), dtype=torch.float32)])
    g = values * factor

    def batches(gen):
        i = torch.randint(0, len(g), (batch,), generator=gen)
        return {"s": T["obs"][rows[i]], "a": acts[i], "g": g[i]}
    return replace(stage, config={**stage.config, "targets": {"exact": targets}}, batches=batches)


def within_state_fit(q_fn, obs: np.ndarray, actions: np.ndarray, values: np.ndarray) -> dict:
    """How ``q_fn`` (raw units) orders the actions of each state: ``actions`` (n, m, d) in the environment's units at
    ``obs`` (n, k), exact ``values`` (n, m). The values centered within each state are compared: their exact RMS
    (``exact_spread``), the critic's RMS error, their correlation over all pairs, and the share of the state's
    action pairs (i < j) whose difference the critic signs as the exact values do."""
    n, m, d = actions.shape
    q = np.asarray(q_fn(np.repeat(obs, m, 0), actions.reshape(n * m, d))).reshape(n, m)
    qc, vc = q - q.mean(1, keepdims=True), values - values.mean(1, keepdims=True)
    i, j = np.triu_indices(m, 1)
    dv, dq = values[:, i] - values[:, j], q[:, i] - q[:, j]
    keep = dv != 0
    return {"states": n, "actions": m, "exact_spread": float(np.sqrt((vc ** 2).mean())),
            "err_rms": float(np.sqrt(((qc - vc) ** 2).mean())), "corr": float(np.corrcoef(qc.ravel(), vc.ravel())[0, 1]),
            "sign_agree": float((np.sign(dq[keep]) == np.sign(dv[keep])).mean())}


def state_actions(a, name: str, full, episodes, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each transition's state of ``full``'s ``episodes`` with its 1 + K actions, the data's first and then the
    ``--extra-actions``, and their exact values (cached as for training): (observations (n, k), actions (n, 1 + K, d)
    in [-1, 1], values (n, 1 + K) in raw units)."""
    sub = replace(full, reward_scaling="none").take_episodes(episodes)  # a few episodes: no return span to scale by
    more, values = extra_actions(a, name, full, episodes, noise)
    return (sub.obs_rows[sub.idx], np.concatenate([sub.actions[:, None], more], 1),
            np.concatenate([exact_labels(a, name, full, episodes)[:, None], values], 1))


def fit_path(out) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_fit.csv")


def fit_rows(a, name: str, full, label: str, critic: str, make, splits: dict, noise: float) -> None:
    """The rows of ``<out>_fit.csv`` for ``label``'s critic at its last step count, one per split (name ->
    episodes of ``full``): :func:`within_state_fit` on each transition's state, its own action and its extra
    actions, all with exact values (computed and cached as for training). Rows already there are kept."""
    path, steps = fit_path(a.out), max(a.steps)
    rows = existing_rows(path)
    have = {(r["run"], r["variant"], int(r["steps"]), r["split"], int(r["episodes"])) for r in rows}
    todo = {k: e for k, e in splits.items() if len(e) and (a.run, label, steps, k, len(e)) not in have}
    if not todo:
        return
    agent, _, stage, data = make(steps)
    store = StageStore(Path(a.work) / "critics", keyed=True, data=data.fingerprint())
    if not store.is_complete(stage.name, stage_hash(stage)):
        raise SystemExit(f"--work: {label}'s critic has no finished checkpoint at {steps} steps")
    run_stage(stage, store, progress=False)
    q = raw_q_fn(agent, data)
    for split, episodes in todo.items():
        obs, acts, vals = state_actions(a, name, full, episodes, noise)
        r = {"run": a.run, "variant": label, "critic": critic, "steps": steps, "split": split,
             "episodes": len(episodes), **within_state_fit(q, obs, full.to_action_box(acts), vals)}
        print(f"{label} {steps} steps, {split} states: pairs signed right {r['sign_agree']:.3f}, corr "
              f"{r['corr']:.3f}, centered error {r['err_rms']:.3f} of spread {r['exact_spread']:.3f}", flush=True)
        rows.append(r)
    write_csv_and_table(path, rows, CRITIC_FIT_COLUMNS, render_critic_fit)


def main(argv=None) -> int:
    p = probe_arguments(__doc__.splitlines()[0])
    p.add_argument("--dataset", default=None, help="the dataset the critics train on (default: the run's); made by "
                   "make-dataset with the run's dataset's recipe but its size")
    p.add_argument("--train-episodes", nargs="+", type=int, required=True,
                   help="episodes each critic trains on (increasing; the first n of a fixed random order)")
    p.add_argument("--other-noise", action="store_true",
                   help="accept a --dataset collected with another action-noise std (make-dataset --collect-noise): "
                        "the same snapshot's mean actions mu(s), spread differently around them")
    p.add_argument("--critic-kind", choices=("run", "iql", "mc", "exact"), default="run",
                   help="the critic trained: the run's (default) or another kind with the run's other settings; "
                        "exact: the mc critic on the exact values of the transitions (labels kept in --work)")
    p.add_argument("--extra-actions", type=int, default=0,
                   help="with --critic-kind exact: K more actions at each state, the data's action plus 1 or 3 noise "
                        "stds of noise, with their exact values (not offline data: how the network learns when it "
                        "sees several actions a state)")
    p.add_argument("--critic-set", default="run",
                   help="'run' (the run's critic settings) or field=value,... changes of them (e.g. hidden=256,depth=3; "
                        "not kind: --critic-kind; not steps: --steps)")
    p.add_argument("--within-weight", type=float, default=0.0,
                   help="with --extra-actions: batches of states with all their actions, and this weight on the "
                        "squared error of the values centered within each state added to the regression (0: off)")
    p.add_argument("--fit-episodes", type=int, default=5,
                   help="with --extra-actions: held-out episodes (the next of the order) on which <out>_fit.csv "
                        "scores the trained critic's ordering of each state's actions, beside its training states")
    p.add_argument("--steps", nargs="+", type=int, default=[20_000, 40_000, 80_000],
                   help="critic training steps at which it is scored (increasing)")
    a = parse_checked(p, argv)
    check_step_counts(p, a.steps)
    if a.extra_actions < 0 or (a.extra_actions and a.critic_kind != "exact"):
        p.error(f"--extra-actions: expected 0 or more, and only with --critic-kind exact, got {a.extra_actions} with "
                f"--critic-kind {a.critic_kind}")
    if not a.within_weight >= 0 or (a.within_weight and not a.extra_actions):
        p.error(f"--within-weight: expected 0 or more, and above 0 only with --extra-actions, got {a.within_weight} "
                f"with --extra-actions {a.extra_actions}")
    if a.fit_episodes < 0:
        p.error(f"--fit-episodes: expected 0 or more, got {a.fit_episodes}")
    try:
        over = parse_variant(a.critic_set)
    except ValueError as e:
        p.error(str(e).replace("--variants", "--critic-set"))
    if "kind" in over:
        p.error("--critic-set: kind is --critic-kind's")
    if any(n < 2 for n in a.train_episodes) or a.train_episodes != sorted(set(a.train_episodes)):
        p.error(f"--train-episodes: expected increasing episode counts of 2 or more, got {a.train_episodes}")
    agent, cfg, run_data = load_critic_run(a.run)
    kind = {} if a.critic_kind == "run" else {"kind": "mc" if a.critic_kind == "exact" else a.critic_kind}
    try:
        check_config(replace(cfg, critic=replace(cfg.critic, **kind, **over)))
    except ValueError as e:
        p.error(f"--critic-set: {e}")
    if critic_kind(replace(cfg, critic=replace(cfg.critic, **kind))) == "insupport":
        raise SystemExit(f"--run: {a.run} has the in-support critic, which reads the behaviour model's actions: it "
                         "would need a behaviour model trained on each subset (use a run with the iql or mc critic)")
    if cfg.critic.lr_decay:
        raise SystemExit(f"--run: {a.run}'s critic decays its learning rate, so its value at each step count would "
                         "depend on the last count")
    name = a.dataset or cfg.dataset
    try:
        full = run_data if name == cfg.dataset else load_minari(name, reward_scaling=cfg.reward_scaling)[0]
    except ValueError as e:
        raise SystemExit(f"--dataset: {e}") from None
    differ = same_data_policy(run_data, full, ignore=("collect_noise",) if a.other_noise else ())
    if differ:
        raise SystemExit(f"--dataset: {name} was not collected as the run's dataset {cfg.dataset} was (differs in "
                         f"{', '.join(differ)}), so its critics would learn another policy's values than the probes'")
    if a.train_episodes[-1] > full.n_episodes:
        p.error(f"--train-episodes: {name} has {full.n_episodes} episodes, fewer than {a.train_episodes[-1]}")
    order = np.random.default_rng(ORDER_SEED).permutation(full.n_episodes)
    noise = float(description_info(full.metadata).get("recipe", {}).get("collect_noise", 0.0))
    if a.extra_actions and not noise > 0:
        p.error(f"--extra-actions: {name} was collected without action noise: no spread to draw the actions with")
    probes = {w: probes_for(a.run, agent, cfg, w, a) for w in a.scales}
    rows = existing_rows(a.out)
    for n in a.train_episodes:
        episodes = np.sort(order[:n])
        data = full.take_episodes(episodes)  # in the stored order: all of them = the run's data
        labels = exact_labels(a, name, full, episodes) if a.critic_kind == "exact" else None
        more = extra_actions(a, name, full, episodes, noise) if a.extra_actions else None

        def make(steps, data=data, labels=labels, more=more):
            vcfg = check_config(replace(cfg, dataset=name, critic=replace(cfg.critic, **kind, **over, steps=steps)))
            v_agent, stages = fresh_critic_stage(vcfg, data)
            stage = next(s for s in stages if s.name == "critic")
            if labels is not None:
                stage = exact_target_stage(stage, data, labels, vcfg.critic.batch, a, extra=more)
            if a.within_weight > 0:  # the same initial networks, the within-state loss
                within = WithinStateCritic(data.state_dim, data.action_dim, vcfg.critic, 1 + a.extra_actions,
                                           a.within_weight)
                within.load_state_dict(v_agent.critic.state_dict())
                v_agent.critic = within
                stage = replace(stage, learner=lambda: v_agent.critic)
            return v_agent, vcfg, stage, data
        exact = "exact" + (f"+{a.extra_actions}" if a.extra_actions else "")  # the mc critic on exact targets
        exact += f"-within{a.within_weight:g}" if a.within_weight > 0 else ""
        settings = f"[{a.critic_set}]" if over else ""  # the critic's settings changed from the run's
        critic = (exact if a.critic_kind == "exact" else critic_kind(replace(cfg, critic=replace(cfg.critic, **kind))))
        extra = {"train_dataset": name, "train_episodes": n, "transitions": data.n, "critic": critic + settings}
        label = f"{name}:{n}" + (f":{exact if a.critic_kind == 'exact' else a.critic_kind}" if kind else "") + settings
        rows = train_and_score(a, label, {}, cfg, data, probes, rows, make=make, extra=extra,
                               columns=CRITIC_DATA_COLUMNS, render=render_critic_data)
        if a.extra_actions:
            held = np.sort(order[n:n + a.fit_episodes])
            fit_rows(a, name, full, label, critic + settings, make, {"train": episodes, "held-out": held}, noise)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
