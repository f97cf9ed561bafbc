"""Diagnostics of trained offline-RL runs: how large each run's guidance is, by diffusion time, and where it takes
the policy by the run's own critic.

``energy_gradient_norms`` measures the mean of ||grad_{a_t} f_phi(s, a_t, t)|| over dataset states and
dataset actions noised to time t (a_t = alpha_t a + sigma_t eps). The exact E_t hardly depends on a_t at
large t (the posterior forgets a_t), so a well-fitted energy's gradient falls toward 0 as t grows;
QGPO's contrastive energy does. ``scripts/energy_gradients.py`` measures it for a set of runs
(``figures/rl_6c/energy_gradients.csv``, rendered to ``.md`` by :func:`render`, docs/derivation.md section 4b, the centered regression).

``guided_q_stats`` compares one guided action per dataset state with K behaviour actions at the same state, by the
run's critic: the guided action's mean Q, how often it is at least the best of the K (1 / (K + 1) at w = 0, by
exchangeability) and its distance to the nearest of them (how far guidance leaves the behaviour's support).
``scripts/guided_q.py`` measures it for a set of runs (rendered by :func:`render_guided_q`).

``energy_fit_stats`` is the error budget's regression part (docs/derivation.md 6b, part 4) in RL, where no exact
E_t exists: the reference is the particle target over ``k_ref`` behaviour actions per state scored by the run's
critic, E_t of pi ∝ mu exp(beta Q) for that behaviour model and critic up to a small Jensen bias (derivation 4b).
At a_t = alpha_t a + sigma_t eps around a fresh behaviour action, it compares with that reference's gradient in
a_t the gradient of the trained f_phi and of the particle target over the first ``k`` of the same actions (what a
K-particle run regresses on): how often each points the reference's way (cosine > 0) and its relative error. For
a run whose target is the mixture posterior (derivation 4b) it also measures that target over the same ``k``
actions with the run's bandwidth (:func:`mixture_target_grad`), which tells the target's error from the regression's.
With ``around = w`` the a_t are drawn around the run's own guided action at scale w instead: the fit where the policy
acts, off the support at large w, where the reference too rests on the few behaviour actions nearest a_t.
``scripts/energy_fit.py`` measures it for a set of runs (rendered by :func:`render_energy_fit`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aepo_lite._checks import check_scalar
from aepo_lite.core.diffusion import energy_guidance

__all__ = ["energy_gradient_norms", "gradient_rows", "gradient_table", "render", "guided_q_stats", "guided_q_rows",
           "render_guided_q", "energy_fit_stats", "mixture_target_grad", "mixture_bandwidth_stats", "mixture_bandwidth_rows",
           "MIXTURE_BANDWIDTH_COLUMNS", "render_mixture_bandwidth", "energy_fit_rows", "render_energy_fit",
           "write_csv_and_table",
           "POLICY_NOISE_COLUMNS", "render_policy_noise", "SUPPORT_ORACLE_COLUMNS", "render_support_oracle",
           "support_oracle_kind", "oracle_settings", "oracle_episodes", "join_oracle_parts",
           "CRITIC_ERRORS_COLUMNS", "render_critic_errors", "csv_per_run", "raw_q_fn",
           "CRITIC_BUDGET_COLUMNS", "render_critic_budget", "CRITIC_SEEDS_COLUMNS", "member_counts",
           "critic_seed_rows", "render_critic_seeds", "CRITIC_DATA_COLUMNS", "render_critic_data"]

TIMES = (0.05, 0.2, 0.5, 0.9)


def energy_gradient_norms(run_dir, times=TIMES, n: int = 512, seed: int = 0) -> dict[float, float]:
    """Mean ||grad_{a_t} f_phi|| over ``n`` dataset transitions (drawn with ``seed``) at each t in ``times``."""
    from aepo_lite.rl.agent import load_run
    agent, cfg, data = load_run(run_dir, device="cpu")
    if agent.energy is None:
        raise ValueError(f"run: {run_dir} ({cfg.method}) has no energy network")
    T = data.tensors(agent.device)
    rng = np.random.default_rng(seed)
    i = torch.as_tensor(rng.choice(T["a"].shape[0], min(n, T["a"].shape[0]), replace=False))
    s, a0 = T["obs"][T["idx"][i]], T["a"][i]
    g = torch.Generator().manual_seed(seed)
    grad = energy_guidance(agent.energy)
    out = {}
    for t0 in times:
        t = torch.full((a0.shape[0],), float(t0))
        alpha, sigma = agent.behaviour.schedule.alpha_sigma(t)
        a_t = alpha[:, None] * a0 + sigma[:, None] * torch.randn(a0.shape, generator=g)
        out[float(t0)] = float(grad(a_t, t, s).norm(dim=-1).mean())
    return out


CSV_COLUMNS = ("dataset", "method", "seed", "t", "grad_norm")
HEADER = ("# Guidance size by diffusion time\n\nMean ||grad_a f_phi(s, a_t, t)|| over 512 dataset transitions, "
          "a_t = alpha_t a + sigma_t eps (measured by `scripts/energy_gradients.py` into `energy_gradients.csv`; "
          "docs/derivation.md section 4b).\n\n")


def _rows_per_run(run_dirs, stats) -> list[dict]:
    """``stats(run_dir) -> list[dict]`` for each run, each dict prefixed with the run's dataset, label and seed."""
    from aepo_lite._io import read_json
    rows = []
    for d in run_dirs:
        res = read_json(Path(d) / "results.json")
        rows += [{"dataset": res["dataset"], "method": res["label"], "seed": res["seed"], **r} for r in stats(d)]
    return rows


def gradient_rows(run_dirs, times=TIMES) -> list[dict]:
    """One CSV row per run and t: dataset, the run's label, seed, t, the mean gradient norm."""
    return _rows_per_run(run_dirs, lambda d: [{"t": t, "grad_norm": v}
                                              for t, v in energy_gradient_norms(d, times).items()])


def gradient_table(rows) -> str:
    """A Markdown table from :func:`gradient_rows` (or the CSV's rows): one line per run, one column per t."""
    times = sorted({float(r["t"]) for r in rows})
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["method"], str(r["seed"])), {})[float(r["t"])] = float(r["grad_norm"])
    lines = ["| dataset | method | seed | " + " | ".join(f"t = {t:g}" for t in times) + " |",
             "|---|---|---|" + "---|" * len(times)]
    for (ds, m, seed), v in cells.items():
        lines.append(f"| {ds} | {m} | {seed} | " + " | ".join(f"{v[t]:.3g}" if t in v else "n/a" for t in times) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_plot(fig, out: Path) -> Path:
    """``fig`` saved atomically to ``out``, then closed."""
    from aepo_lite._io import atomic_save_figure
    atomic_save_figure(out, fig)
    _pyplot().close(fig)
    return out


def _groups(rows) -> list[str]:
    """The candidate groups of critic rows, the policy's own first."""
    return sorted({r["group"] for r in rows}, key=lambda g: (g != "policy", g))


def _csv_rows(csv_path) -> list[dict]:
    """A diagnostic CSV's rows (dicts of strings)."""
    import csv
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _render_table(csv_path, header: str, table, made_by: str) -> list[Path]:
    """The CSV's ``.md`` table beside it (``header`` + ``table(rows)``), from the CSV alone."""
    from aepo_lite._io import write_table
    rows = _csv_rows(csv_path)
    return write_table(Path(csv_path).with_suffix(".md"), rows, header, table, csv_path=csv_path, made_by=made_by)


def existing_rows(out) -> list[dict]:
    """A diagnostic script's CSV ``out`` as rows so far (a rerun skips what they hold); [] when it is absent."""
    if not str(out).endswith(".csv"):
        raise ValueError(f"out: expected a .csv path, got {str(out)!r}")
    return _csv_rows(out) if Path(out).exists() else []


def write_csv_and_table(out, rows, columns, render_fn) -> list[Path]:
    """A diagnostic script's output: ``rows`` into the CSV ``out`` (atomically) and its ``.md`` table beside it."""
    from aepo_lite._io import atomic_write_csv
    if not str(out).endswith(".csv"):
        raise ValueError(f"out: expected a .csv path, got {str(out)!r}")
    atomic_write_csv(Path(out), rows, columns)
    return [Path(out), *render_fn(out, Path(out).parent)]


def csv_per_run(out, runs, run_rows, columns, render_fn) -> list[Path]:
    """A diagnostic script's loop over trained runs: the CSV ``out``'s rows so far, then for each run
    ``run_rows(run, rows)`` (the rows it adds, skipping those ``rows`` holds), the CSV and its table rewritten as
    each run lands, so a killed script loses no finished run. Returns the paths written."""
    rows = existing_rows(out)
    paths = write_csv_and_table(out, rows, columns, render_fn) if rows else []
    for run in runs:
        rows += run_rows(run, rows)
        paths = write_csv_and_table(out, rows, columns, render_fn)
    return paths


def render(csv_path, figures_dir) -> list[Path]:
    """``energy_gradients.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    return _render_table(csv_path, HEADER, gradient_table, "scripts/energy_gradients.py")


@torch.no_grad()
def guided_q_stats(run_dir, scales=(0.1, 1.0), n: int = 500, k: int = 16, seed: int = 0) -> list[dict]:
    """At ``n`` dataset states (drawn with ``seed``): ``k`` behaviour actions each (w = 0), then one guided action
    each at every w in ``scales``, all scored by the run's critic. One dict per w (0 first): ``q_mean``, the mean Q
    of the w-policy's action (at w = 0: of one behaviour action); ``q_best_of_k``, the mean of the best of the k
    behaviour actions' Q; ``frac_at_best``, how often the w-policy's action has Q at least that best;
    ``support_distance``, its mean distance to the nearest of the k behaviour actions (actions in [-1, 1]^d)."""
    from aepo_lite.rl.agent import load_run
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    agent, cfg, data = load_run(run_dir, device="cpu")
    if agent.critic is None:
        raise ValueError(f"run: {run_dir} ({cfg.method}) has no critic")
    obs = data.tensors(agent.device)["obs"]
    rows = torch.as_tensor(np.random.default_rng(seed).choice(obs.shape[0], min(n, obs.shape[0]), replace=False))
    s = obs[rows]
    g = torch.Generator().manual_seed(seed)
    support = agent.act_unit(s.repeat_interleave(k + 1, 0), 0.0, generator=g).reshape(len(s), k + 1, -1)
    q = agent.critic.q_fn(s.repeat_interleave(k + 1, 0), support.reshape(len(s) * (k + 1), -1)).reshape(len(s), -1)
    best = q[:, 1:].max(1).values  # the k behaviour actions; column 0 is the w = 0 policy's own draw
    out = []
    for w in (0.0, *[float(x) for x in scales if float(x) != 0]):
        a = support[:, 0] if w == 0 else agent.act_unit(s, w, generator=g)
        qa = q[:, 0] if w == 0 else agent.critic.q_fn(s, a)
        out.append({"w": w, "q_mean": float(qa.mean()), "q_best_of_k": float(best.mean()),
                    "frac_at_best": float((qa >= best).float().mean()),
                    "support_distance": float((support[:, 1:] - a[:, None]).norm(dim=-1).min(1).values.mean())})
    return out


GUIDED_Q_COLUMNS = ("dataset", "method", "seed", "k", "w", "q_mean", "q_best_of_k", "frac_at_best",
                    "support_distance")
GUIDED_Q_HEADER = ("# Where guidance takes the policy, by the run's critic\n\nAt 500 dataset states: K behaviour "
                   "actions each and one action of the w-policy, scored by the run's own critic (measured by "
                   "`scripts/guided_q.py` into `guided_q.csv`). `at best`: how often the w-policy's action has Q at "
                   "least the best of the K (1 / (K + 1) at w = 0); `distance`: its mean distance to the nearest of "
                   "the K (actions in [-1, 1]^d).\n\n")


def guided_q_rows(run_dirs, scales=(0.1, 1.0), k: int = 16) -> list[dict]:
    """One CSV row per run and w (:func:`guided_q_stats`), with the run's dataset, label and seed."""
    return _rows_per_run(run_dirs, lambda d: [{"k": k, **r} for r in guided_q_stats(d, scales, k=k)])


def guided_q_table(rows) -> str:
    """A Markdown table from :func:`guided_q_rows` (or the CSV's rows), one line per run and w."""
    lines = ["| dataset | method | seed | w | mean Q | best of K behaviour Q (K) | at best | distance |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['method']} | {r['seed']} | {float(r['w']):g} | {float(r['q_mean']):.1f} "
                     f"| {float(r['q_best_of_k']):.1f} ({r['k']}) | {float(r['frac_at_best']):.2f} "
                     f"| {float(r['support_distance']):.3f} |")
    return "\n".join(lines) + "\n"


def render_guided_q(csv_path, figures_dir) -> list[Path]:
    """``guided_q.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    return _render_table(csv_path, GUIDED_Q_HEADER, guided_q_table, "scripts/guided_q.py")


FIT_TIMES = (0.02, 0.05, 0.1, 0.2, 0.5)


def _agreement(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """How often g points the reference's way (cosine > 0), and its relative error median|g - ref| / median|ref|."""
    agree = float((torch.nn.functional.cosine_similarity(g, ref, dim=-1) > 0).float().mean())
    return agree, float((g - ref).norm(dim=-1).median() / ref.norm(dim=-1).median().clamp_min(1e-12))


def mixture_target_grad(a_t: torch.Tensor, s: torch.Tensor, support: torch.Tensor, q_fn, beta: float, alpha, sigma,
                        bandwidth: float, clip: float | None = 1.0):
    """The gradient in a_t (B, d) of the mixture target over ``support`` (B, K, d) (docs/derivation.md 4b; the
    energy stage's ``posterior = mixture`` target), through every place a_t enters it: the responsibilities, the
    component means m~_k where Q is read, and Q's gradient there (so Q's second derivatives too). Returns it with the
    target's two terms per component, (B, K) each, detached: beta Q(m~_k) and (beta^2 / 2) s~^2 |grad Q(m~_k)|^2."""
    from aepo_lite.core import guidance as G
    B, K, d = support.shape
    with torch.enable_grad():
        x = a_t.detach().requires_grad_(True)
        log_r, m_t, s2 = G.mixture_posterior(x, support, bandwidth, alpha, sigma)
        m = (m_t if clip is None else m_t.clamp(-clip, clip)).reshape(B * K, d)
        q = q_fn(s.repeat_interleave(K, 0), m)
        (g,) = torch.autograd.grad(q.sum(), m, create_graph=True)
        q, g = q.reshape(B, K), g.reshape(B, K, d)
        y = G.mixture_target_first(log_r, q, g, s2, beta)
        grad = torch.autograd.grad(y.sum(), x)[0]
    return grad, (beta * q).detach(), (0.5 * beta**2 * s2[:, None] * (g**2).sum(-1)).detach()


def _fit_setup(run_dir, n: int, k: int | None, k_ref: int, seed: int, need_energy: bool = True,
               around: float = 0.0) -> dict:
    """What :func:`energy_fit_stats` and :func:`mixture_bandwidth_stats` share: the run, ``n`` dataset states, ``k_ref``
    behaviour actions a state scored by the run's critic (the reference's particles) and one more action a state for
    a_t to be drawn around: a behaviour action, or at ``around`` > 0 the run's own guided action at that scale (drawn
    after the reference's, which are the same at any ``around``)."""
    around = check_scalar("around", around, low=0.0)
    from aepo_lite.rl.agent import load_run
    agent, cfg, data = load_run(run_dir, device="cpu")
    k = cfg.support.k if k is None else k
    for name, v in (("k", k), ("k_ref", k_ref), ("n", n)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if k > k_ref:
        raise ValueError(f"k: {k} is more than k_ref ({k_ref}); the k-particle target uses the first k of the reference's")
    if agent.critic is None or (need_energy and agent.energy is None):
        needs = "an energy network and a critic" if need_energy else "a critic"
        raise ValueError(f"run: {run_dir} ({cfg.method}) needs {needs}")
    obs = data.tensors(agent.device)["obs"]
    s = obs[torch.as_tensor(np.random.default_rng(seed).choice(obs.shape[0], min(n, obs.shape[0]), replace=False))]
    B, g = s.shape[0], torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref = agent.act_unit(s.repeat_interleave(k_ref + 1, 0), 0.0, generator=g).reshape(B, k_ref + 1, -1)
        a0, ref = ref[:, 0], ref[:, 1:]  # a0: where a_t is drawn around, apart from the reference's actions
        q = agent.critic.q_fn(s.repeat_interleave(k_ref, 0), ref.reshape(B * k_ref, -1)).reshape(B, k_ref)
    if around:
        a0 = agent.act_unit(s, around, generator=g).detach()  # the run's guided action at w = around
    return {"agent": agent, "cfg": cfg, "s": s, "a0": a0, "ref": ref, "q": q, "k": k, "k_ref": k_ref, "gen": g,
            "beta": cfg.energy.beta, "around": around}


def _fit_at(f: dict, t0: float):
    """At time t0: (t, alpha, sigma, a_t, grad of the reference, grad of the k-particle target)."""
    from aepo_lite.core import guidance as G
    B, k, beta = f["s"].shape[0], f["k"], f["beta"]
    t = torch.full((B,), float(t0))
    alpha, sigma = f["agent"].behaviour.schedule.alpha_sigma(t)
    a_t = (alpha[:, None] * f["a0"] + sigma[:, None] * torch.randn(f["a0"].shape, generator=f["gen"]))
    a_t.requires_grad_(True)
    g_ref, g_k = (torch.autograd.grad(G.particle_target(a_t, sup, sq, beta, alpha, sigma).sum(), a_t)[0]
                  for sup, sq in ((f["ref"], f["q"]), (f["ref"][:, :k], f["q"][:, :k])))
    return t, alpha, sigma, a_t.detach(), g_ref, g_k


def _spread(v: torch.Tensor) -> float:
    """max - min over a state's K components (B, K), the median over the states."""
    return float((v.max(1).values - v.min(1).values).median())


def energy_fit_stats(run_dir, times=FIT_TIMES, n: int = 256, k: int | None = None, k_ref: int = 128,
                     seed: int = 0, around: float = 0.0) -> list[dict]:
    """At ``n`` dataset states (drawn with ``seed``) and each t in ``times``: the gradients in a_t of the trained
    energy and of the ``k``-particle target (default: the run's ``support.k``) against the ``k_ref``-particle
    reference (module docstring), a_t drawn around a behaviour action or, at ``around`` = w > 0, around the run's
    own guided action at scale w (where its policy acts, off the support at large w). One dict per t: ``around_w``,
    ``ref_grad`` (median |grad E_ref|), ``target_agree`` /
    ``target_rel_err`` (the k-particle target) and ``energy_agree`` / ``energy_rel_err`` (f_phi), ``energy_grad``;
    for a run with the mixture posterior also ``mix_target_agree`` / ``mix_target_rel_err``, its own target over the
    same k actions (:func:`mixture_target_grad`), and ``mix_value_spread`` / ``mix_variance_spread``, how much its
    two terms vary over the k components of a state (max - min, the median over the states)."""
    f = _fit_setup(run_dir, n, k, k_ref, seed, around=around)
    agent, cfg, k = f["agent"], f["cfg"], f["k"]
    guide, out = energy_guidance(agent.energy), []
    for t0 in times:
        t, alpha, sigma, a_t, g_ref, g_k = _fit_at(f, t0)
        g_f = guide(a_t, t, f["s"])
        (ta, te), (ea, ee) = _agreement(g_k, g_ref), _agreement(g_f, g_ref)
        row = {"t": float(t0), "k": k, "k_ref": k_ref, "around_w": f["around"],
               "ref_grad": float(g_ref.norm(dim=-1).median()),
               "target_agree": ta, "target_rel_err": te, "energy_grad": float(g_f.norm(dim=-1).median()),
               "energy_agree": ea, "energy_rel_err": ee}
        if cfg.energy.posterior == "mixture":
            g_m, lin, var = mixture_target_grad(a_t, f["s"], f["ref"][:, :k], agent.critic.q_fn, f["beta"], alpha,
                                                sigma, cfg.energy.bandwidth, cfg.energy.clip)
            row["mix_target_agree"], row["mix_target_rel_err"] = _agreement(g_m, g_ref)
            row["mix_value_spread"], row["mix_variance_spread"] = _spread(lin), _spread(var)
        out.append(row)
    return out


def mixture_bandwidth_stats(run_dir, bandwidths, times=FIT_TIMES, n: int = 256, k: int | None = None,
                            k_ref: int = 128, seed: int = 0) -> list[dict]:
    """The approximation part of the error budget for the mixture target in RL, at each bandwidth h of
    ``bandwidths``: at the states and a_t of :func:`energy_fit_stats`, the mixture target over the first ``k``
    behaviour actions with the run's critic (no training: any run with a critic) against the ``k_ref``-particle
    reference. One dict per t and h: ``agree`` / ``rel_err`` and ``value_spread`` / ``variance_spread`` (the
    target's two terms' spread over a state's components). h = 0 is the k-particle target."""
    hs = [check_scalar("bandwidths", h, low=0.0) for h in bandwidths]
    if not hs:
        raise ValueError("bandwidths: expected at least one bandwidth h >= 0")
    f = _fit_setup(run_dir, n, k, k_ref, seed, need_energy=False)
    out = []
    for t0 in times:
        _, alpha, sigma, a_t, g_ref, _ = _fit_at(f, t0)
        for h in hs:
            g_m, lin, var = mixture_target_grad(a_t, f["s"], f["ref"][:, :f["k"]], f["agent"].critic.q_fn, f["beta"],
                                                alpha, sigma, h, f["cfg"].energy.clip)
            agree, rel = _agreement(g_m, g_ref)
            out.append({"t": float(t0), "k": f["k"], "k_ref": k_ref, "bandwidth": h, "agree": agree, "rel_err": rel,
                        "value_spread": _spread(lin), "variance_spread": _spread(var)})
    return out


ENERGY_FIT_COLUMNS = ("dataset", "method", "seed", "t", "k", "k_ref", "around_w", "ref_grad", "target_agree",
                      "target_rel_err", "energy_grad", "energy_agree", "energy_rel_err", "mix_target_agree",
                      "mix_target_rel_err", "mix_value_spread", "mix_variance_spread")
ENERGY_FIT_HEADER = ("# How well each trained energy's gradient follows E_t (the error budget's regression part)\n\n"
                     "At 256 dataset states and a_t = alpha_t a + sigma_t eps around a behaviour action: the gradient "
                     "in a_t of the trained f_phi, and of the particle target over the first K of those behaviour "
                     "actions, against the reference E_t (the particle target over K_ref = 128 behaviour actions "
                     "scored by the run's own critic; docs/derivation.md 4b). `agree`: how often the gradient points "
                     "the reference's way (cosine > 0; 0.5 is chance in one dimension); `rel err`: median "
                     "|g - g_ref| / median |g_ref|; each cell `agree / rel err`, a mean over the seeds listed "
                     "(measured by `scripts/energy_fit.py` into `energy_fit.csv`). A line `target of RUN` is a mixture "
                     "run's own target (docs/derivation.md 4b) over the same K actions with its bandwidth. Lines "
                     "`a_t around w = W` draw a_t around each run's own guided action at scale W instead (where its "
                     "policy acts; `scripts/energy_fit.py --around-scale W`).\n\n")


def energy_fit_rows(run_dirs, times=FIT_TIMES, k_ref: int = 128, around: float = 0.0) -> list[dict]:
    """One CSV row per run and t (:func:`energy_fit_stats`), with the run's dataset, label and seed."""
    return _rows_per_run(run_dirs, lambda d: energy_fit_stats(d, times, k_ref=k_ref, around=around))


def mixture_bandwidth_rows(run_dirs, bandwidths, times=FIT_TIMES, k_ref: int = 128) -> list[dict]:
    """One CSV row per run, t and h (:func:`mixture_bandwidth_stats`), with the run's dataset, label and seed."""
    return _rows_per_run(run_dirs, lambda d: mixture_bandwidth_stats(d, bandwidths, times, k_ref=k_ref))


def energy_fit_table(rows) -> str:
    """A Markdown table from :func:`energy_fit_rows` (or the CSV's rows): one line per dataset and method, one
    column per t, each cell ``agree / rel err`` as a mean over the method's seeds; above each dataset's methods,
    the K-particle target itself (its seeds' and methods' mean, K and K_ref as in the rows)."""
    times = sorted({float(r["t"]) for r in rows})
    cells: dict = {}
    for r in rows:
        w = float(r.get("around_w") or 0)  # older CSVs have no such column: a_t around behaviour actions
        at = f" (a_t around w = {w:g})" if w else ""
        key = (r["dataset"], f"K-particle target (K = {r['k']}, K_ref = {r['k_ref']}){at}")
        parts = [(key, "target_agree", "target_rel_err"),
                 ((r["dataset"], r["method"] + at), "energy_agree", "energy_rel_err")]
        if r.get("mix_target_agree") not in (None, ""):  # a mixture run (older CSVs have no such column)
            parts.insert(1, ((r["dataset"], f"target of {r['method']}{at}"), "mix_target_agree", "mix_target_rel_err"))
        for (ds, name), a, e in parts:
            cells.setdefault((ds, name), {}).setdefault(float(r["t"]), []).append((float(r[a]), float(r[e]), r["seed"]))
    def order(kv):  # per dataset: the K-particle target, the mixture runs' own targets, then the energies
        name = kv[0][1]
        return kv[0][0], 0 if name.startswith("K-") else 1 if name.startswith("target of") else 2, name
    lines = _pair_table(cells, times, "gradient of", order)
    return "\n".join(lines + _mixture_terms_table(rows, times)) + "\n"


def _pair_table(cells: dict, times, what: str, key=None) -> list[str]:
    """Table lines from ``cells`` {(dataset, name): {t: [(a, b, seed), ...]}}: one line per (dataset, name) in the
    order of ``key``, its seeds, and per t the cell ``a / b``, each a mean over the seeds."""
    lines = [f"| dataset | {what} | seeds | " + " | ".join(f"t = {t:g}" for t in times) + " |",
             "|---|---|---|" + "---|" * len(times)]
    for (ds, name), by_t in sorted(cells.items(), key=key):
        seeds = sorted({str(x[2]) for v in by_t.values() for x in v})
        cols = [f"{np.mean([x[0] for x in by_t[t]]):.2f} / {np.mean([x[1] for x in by_t[t]]):.2f}" if t in by_t
                else "n/a" for t in times]
        lines.append(f"| {ds} | {name} | {', '.join(seeds)} | " + " | ".join(cols) + " |")
    return lines


def _mixture_terms_table(rows, times) -> list[str]:
    """Below the energy-fit table, for mixture runs: how much each of the target's two terms varies over a state's
    K components (medians over states, means over seeds), ``beta Q / variance term`` per t."""
    cells: dict = {}
    for r in rows:
        if r.get("mix_value_spread") not in (None, ""):
            cells.setdefault((r["dataset"], r["method"]), {}).setdefault(float(r["t"]), []).append(
                (float(r["mix_value_spread"]), float(r["mix_variance_spread"]), str(r["seed"])))
    if not cells:
        return []
    return ["", "The mixture targets' two terms, log sum_k r_k exp(beta Q(m~_k) + (beta^2 / 2) s~^2 "
            "|grad Q(m~_k)|^2): how much each varies over a state's K components (max - min, median over the states), "
            "`beta Q / variance term`. Where the second varies more, the target weighs a state's components more by "
            "the critic's slope across the kernel (over actions the kernel adds around each support action) than by "
            "its value at them.", "", *_pair_table(cells, times, "run")]


MIXTURE_BANDWIDTH_COLUMNS = ("dataset", "method", "seed", "t", "k", "k_ref", "bandwidth", "agree", "rel_err",
                             "value_spread", "variance_spread")
MIXTURE_BANDWIDTH_HEADER = (
    "# The mixture target's bandwidth in offline RL (the error budget's approximation part)\n\nAt the energy-fit "
    "table's states and a_t (256 dataset states, a_t around a behaviour action), the gradient in a_t of the mixture "
    "target (docs/derivation.md 4b; K behaviour actions a state, kernels N(a^(k), h^2 I), the run's own critic, "
    "no training) against the reference E_t (the particle target over K_ref = 128 behaviour actions). h = 0 is the "
    "K-particle target. Each cell: `agree / rel err` as in `energy_fit.md`, then in brackets how much the target's "
    "two terms vary over a state's components (max - min, median over the states), `beta Q / variance term`; a "
    "mean over the runs listed (measured by `scripts/energy_fit.py --mixture-bandwidths` into "
    "`mixture_bandwidth.csv`).\n\n")


def mixture_bandwidth_table(rows) -> str:
    """A Markdown table from :func:`mixture_bandwidth_stats`'s rows (or the CSV's): a line per dataset and h."""
    times = sorted({float(r["t"]) for r in rows})
    cells: dict = {}
    for r in rows:
        key = (r["dataset"], float(r["bandwidth"]), int(r["k"]))
        cells.setdefault(key, {}).setdefault(float(r["t"]), []).append(r)
    lines = ["| dataset | K | h | runs | " + " | ".join(f"t = {t:g}" for t in times) + " |",
             "|---|---|---|---|" + "---|" * len(times)]
    for (ds, h, k), by_t in sorted(cells.items()):
        runs = sorted({f"{r['method']} s{r['seed']}" for v in by_t.values() for r in v})
        mean = lambda v, c: np.mean([float(r[c]) for r in v])  # noqa: E731
        cols = [f"{mean(v, 'agree'):.2f} / {mean(v, 'rel_err'):.2f} ({mean(v, 'value_spread'):.1f} / "
                f"{mean(v, 'variance_spread'):.1f})" if (v := by_t.get(t)) else "n/a" for t in times]
        lines.append(f"| {ds} | {k} | {h:g} | {len(runs)} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def render_mixture_bandwidth(csv_path, figures_dir) -> list[Path]:
    """``mixture_bandwidth.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    return _render_table(csv_path, MIXTURE_BANDWIDTH_HEADER, mixture_bandwidth_table,
                         "scripts/energy_fit.py --mixture-bandwidths")


def render_energy_fit(csv_path, figures_dir) -> list[Path]:
    """``energy_fit.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    return _render_table(csv_path, ENERGY_FIT_HEADER, energy_fit_table, "scripts/energy_fit.py")


POLICY_NOISE_COLUMNS = ("dataset", "snapshot", "noise", "episodes", "return_mean", "score_mean", "score_std")
POLICY_NOISE_HEADER = ("# A dataset's own policy with action noise\n\nThe policy that made each dataset (its snapshot "
                       "of the TD3 ladder), deterministic and with N(0, std^2) action noise, clipped to the box; "
                       "normalised with the dataset's reference scores (measured by `scripts/policy_noise.py` into "
                       "`policy_noise.csv`; :func:`aepo_lite.rl.oracle.snapshot_noise_scores`).\n\n")


def policy_noise_table(rows) -> str:
    """A Markdown table from ``scripts/policy_noise.py``'s rows (or its CSV's), one line per dataset and noise."""
    lines = ["| dataset | snapshot | noise std | episodes | return | normalised score |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['snapshot']} | {float(r['noise']):g} | {r['episodes']} "
              f"| {float(r['return_mean']):.1f} | {float(r['score_mean']):.1f} +- {float(r['score_std']):.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def render_policy_noise(csv_path, figures_dir) -> list[Path]:
    """``policy_noise.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    return _render_table(csv_path, POLICY_NOISE_HEADER, policy_noise_table, "scripts/policy_noise.py")


SUPPORT_ORACLE_COLUMNS = ("dataset", "snapshot", "search", "noise", "data_noise", "candidates", "horizon", "gamma", "continuation_noise",
                          "episodes", "return_mean", "score_mean", "score_std", "length_mean", "seconds",
                          "continuation_draws", "first_episode", "episode_scores")
SUPPORT_ORACLE_HEADER = (
    "# The best of N of a dataset's own actions, chosen by the true return\n\nAt every step N actions of the policy "
    "that made the dataset (its TD3 snapshot plus the data's action noise: the behaviour's support) are each "
    "scored by a rollout of the environment from the current state (the action, then the snapshot's policy with "
    "the continuation's noise std for the horizon's remaining steps, discounted by gamma, the same continuation "
    "noise for every candidate), and the best is taken; N = 1 is the data's own policy. With continuation noise "
    "0 each score is the deterministic snapshot's exact Q(s, a) over the horizon (gamma 1 and horizon 1000: its "
    "return to the episode's end), so the row is the policy-improvement step over that policy restricted to N "
    "support actions; with the data's noise it is one noisy draw, or (`x M`) the mean of M draws shared by every "
    "candidate: an estimate of the data policy's own Q, the step over the data's policy that an in-support method "
    "with a perfect critic of it would take at N candidates. Search `sequence`: at every step N whole "
    "trajectories of the data's own policy (its noise at every step, each candidate its own draws) are rolled out "
    "to the episode's end, the best one's first action is taken and the rest of it is a candidate again at the next "
    "step: a search over several steps of improvement in which every action is one the data's policy could draw "
    "(the continuation noise column shows the std of those draws). Episodes `n (from i)`: a part, episodes i to "
    "i + n - 1 (reset seeds 100000 + i ...), measured in its own process; parts that together hold episodes 0 to "
    "n - 1 are shown joined as one row (seconds: the episodes' search time, summed over the processes that took "
    "their steps, a killed run resumed included). Normalised with the dataset's "
    "reference scores (measured by `scripts/support_oracle.py` into `support_oracle.csv`; "
    ":func:`aepo_lite.rl.oracle.snapshot_oracle_scores`).\n\n")


def support_oracle_table(rows) -> str:
    """A Markdown table from ``scripts/support_oracle.py``'s rows (or its CSV's), one line per dataset, N, horizon."""
    lines = ["| dataset | snapshot | search | noise std (the data's) | N | horizon | gamma | continuation noise | "
             "episodes | return | normalised score | mean length | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['snapshot']} | {r.get('search') or 'step'} "
              f"| {float(r['noise']):g} ({float(r['data_noise']):g}) "
              f"| {r['candidates']} | {r['horizon']} "
              f"| {float(r['gamma']):g} | {float(r['continuation_noise']):g}{_draws(r)} | {_episodes_cell(r)} | {float(r['return_mean']):.1f} | {float(r['score_mean']):.1f} +- "
              f"{float(r['score_std']):.1f} | {float(r['length_mean']):.0f} | {float(r['seconds']):.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _episodes_cell(row) -> str:
    """A support-oracle row's episode count, with the first episode's index for a part that does not start at 0."""
    e = oracle_episodes(row)
    return f"{len(e)}" if e.start == 0 else f"{len(e)} (from {e.start})"


def oracle_settings(row) -> tuple:
    """What a support-oracle row (a CSV dict or :func:`aepo_lite.rl.oracle.snapshot_oracle_scores`' dict with
    ``dataset`` and ``snapshot``) measured, less which episodes: rows with equal settings differ only by their
    episodes' draws."""
    return (row["dataset"], row["snapshot"], row.get("search") or "step", int(row["candidates"]), int(row["horizon"]),
            round(float(row["noise"]), 9), round(float(row["continuation_noise"]), 9), round(float(row["gamma"]), 9),
            int(row.get("continuation_draws") or 1))


def oracle_episodes(row) -> range:
    """The episodes (their indices: reset seeds 100000 + i) a support-oracle row holds; rows from before the
    ``first_episode`` column start at 0."""
    first = int(row.get("first_episode") or 0)
    return range(first, first + int(row["episodes"]))


def _scores(row) -> list[float]:
    v = row.get("episode_scores")
    return [float(x) for x in v.split()] if isinstance(v, str) else [float(x) for x in (v or [])]


def join_oracle_parts(rows) -> list[dict]:
    """Support-oracle rows with the parts of one measurement joined: rows of equal :func:`oracle_settings` whose
    episodes, taken in order, are 0, 1, ..., n - 1 exactly once (as ``scripts/support_oracle.py
    --first-episode`` writes them from several processes) and that all list their ``episode_scores`` become the one
    row a single process would have written for n episodes (each episode draws from its own generator): the
    scores' mean and std (over episodes, ``ddof = 0``), return and length means weighted by episodes, seconds summed
    (the processes' time, not the wall clock's). Any other group is left as it is, so an overlapping or incomplete
    set of parts stays visible row by row. Order: the first part's place."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(oracle_settings(r), []).append(i)
    joined, drop = {}, set()
    for idx in groups.values():
        parts = sorted((rows[i] for i in idx), key=lambda r: oracle_episodes(r).start)
        if len(parts) < 2 or any(len(_scores(r)) != int(r["episodes"]) for r in parts):
            continue
        if [e for r in parts for e in oracle_episodes(r)] != list(range(sum(int(r["episodes"]) for r in parts))):
            continue
        scores = np.array([v for r in parts for v in _scores(r)])
        w = np.array([int(r["episodes"]) for r in parts], dtype=float)
        row = {**parts[0], "episodes": len(scores), "first_episode": 0,
               "episode_scores": " ".join(f"{v:.6f}" for v in scores),
               "score_mean": float(scores.mean()), "score_std": float(scores.std()),
               "return_mean": float(np.dot(w, [float(r["return_mean"]) for r in parts]) / w.sum()),
               "length_mean": float(np.dot(w, [float(r["length_mean"]) for r in parts]) / w.sum()),
               "seconds": float(sum(float(r["seconds"]) for r in parts))}
        joined[min(idx)] = row
        drop.update(idx)
    return [joined[i] if i in joined else r for i, r in enumerate(rows) if i in joined or i not in drop]


def _draws(row) -> str:
    """`` x M`` for a support-oracle row whose candidates were scored by the mean of M noisy rollouts, else ''."""
    m = int(row.get("continuation_draws") or 1)
    return f" x {m}" if m > 1 else ""


def support_oracle_kind(row) -> str:
    """What a support-oracle row (CSV dict) measures: ``policy`` (N = 1, the data's policy), ``noisy`` (one noisy
    rollout a candidate), ``mean-noisy`` (the mean of several: the data policy's Q), ``support`` (exact Q,
    candidates of the data's own noise), ``wider`` (exact Q, more noise), ``sequence`` (the search over whole
    trajectories of the data's noise) or ``sequence-wider`` (of more noise)."""
    if int(row["candidates"]) == 1:
        return "policy"
    if (row.get("search") or "step") == "sequence":
        return "sequence" if abs(float(row["noise"]) - float(row["data_noise"])) < 1e-9 else "sequence-wider"
    if float(row["continuation_noise"]) > 0:
        return "mean-noisy" if _draws(row) else "noisy"
    return "support" if abs(float(row["noise"]) - float(row["data_noise"])) < 1e-9 else "wider"


def render_support_oracle(csv_path, figures_dir) -> list[Path]:
    """``support_oracle.md`` and ``support_oracle.png`` beside the CSV (``aepo-lite figures``). The plot: score
    against N per dataset, one line per kind of row (exact Q within the data's noise, one noisy rollout, wider
    candidates); BC and the default AEPO estimator at their best w as horizontal lines when the larger-energy
    sweep's CSV (``rl_6c_big.csv``) sits in the figures folder above."""
    written = _render_table(csv_path, SUPPORT_ORACLE_HEADER, support_oracle_table, "scripts/support_oracle.py")
    return written + [_plot_support_oracle(Path(csv_path), Path(csv_path).resolve().parent.parent / "rl_6c_big.csv")]


def _plot_support_oracle(csv_path: Path, rl_csv: Path) -> Path:
    plt = _pyplot()
    rows = _csv_rows(csv_path)
    datasets = sorted({r["dataset"] for r in rows})
    refs = {}
    if rl_csv.exists():
        from aepo_lite.course.summary import default_aepo_label, rl_summary
        for (ds, preset), res in rl_summary(rl_csv).items():
            m, refs[ds] = res["methods"], []
            if "bc" in m:
                b = m["bc"]["mean"]
                refs[ds] += [(f"BC ({b:.1f})", b, "0.5", "-"), (f"BC + 5 ({b + 5:.1f})", b + 5, "0.5", ":")]
            lab = default_aepo_label(preset)
            if lab in m:
                refs[ds].append((f"default AEPO, best w ({m[lab]['mean']:.1f})", m[lab]["mean"], "C3", "--"))
    fig, axes = plt.subplots(1, len(datasets), figsize=(9.6 * len(datasets), 4.6), squeeze=False,
                             layout="constrained")
    order = ("policy", "support", "mean-noisy", "noisy", "sequence", "wider", "sequence-wider")  # the support first
    for ax, ds in zip(axes[0], datasets):
        mine = sorted((r for r in rows if r["dataset"] == ds),
                      key=lambda r: (order.index(support_oracle_kind(r)), float(r["noise"]), int(r["horizon"])))
        kinds = {}
        for r in mine:
            kind = {"policy": "the data's policy (N = 1)", "support": "the data's actions, exact Q to the end",
                    "wider": f"{float(r['noise']) / float(r['data_noise']):g}x the data's noise, exact Q to the end",
                    "noisy": f"the data's actions, one noisy rollout of {r['horizon']} steps",
                    "mean-noisy": "the data's actions, the data policy's Q (mean of several noisy rollouts) to the "
                                  "end",
                    "sequence": "whole trajectories of the data's policy, replanned each step",
                    "sequence-wider": f"whole trajectories with {float(r['noise']) / float(r['data_noise']):g}x the "
                                      "data's noise, replanned each step"}[support_oracle_kind(r)]
            kinds.setdefault(kind, []).append((int(r["candidates"]), float(r["score_mean"]), float(r["score_std"])))
        for i, (kind, pts) in enumerate(kinds.items()):
            pts.sort()
            x, y, e = zip(*pts)
            shift = 2 ** (0.05 * (i - (len(kinds) - 1) / 2))  # a little apart, so that error bars at one N do not hide
            ax.errorbar([v * shift for v in x], y, yerr=e, marker="os^vD"[i % 5], capsize=3, color=f"C{i}",
                        label=kind, gid=kind)
        for label, y, colour, style in refs.get(ds, []):
            ax.axhline(y, color=colour, linestyle=style, label=label, gid=label)
        ax.set_xscale("log", base=2)
        ns = sorted({int(r["candidates"]) for r in mine})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N, candidates per step (points at one N drawn a little apart)")
        ax.set_ylabel("normalised score (+- std over episodes)")
        ax.set_title(f"{ds}: the best of N by the true return", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save_plot(fig, csv_path.with_suffix(".png"))


SUPPORT_SPREAD_COLUMNS = ("dataset", "run", "label", "seed", "guidance_scale", "episodes", "steps", "noise", "z_rms",
                          "beyond3", "score_mean", "score_std")
SUPPORT_SPREAD_HEADER = (
    "# How far from the data's own actions a trained policy acts\n\nAt every step of a policy's evaluation "
    "episodes, its action's offset from the mean action of the policy that made the dataset (its TD3 snapshot), in "
    "units of the data's action-noise std: z = (a - mu(s)) / std per action dimension. The dataset's own actions "
    "are mu(s) plus that noise, clipped to the box (the `data` row: its transitions, its episodes' score). RMS z "
    "about 1 and almost no step beyond 3 stds: the policy acts within the data's support; more: it leaves it. "
    "Means over the seeds (runs) of each row, the score's +- its std over seeds (measured by "
    "`scripts/support_spread.py` into `support_spread.csv`; :func:`aepo_lite.rl.oracle.snapshot_action_spread`)."
    "\n\n")


def support_spread_table(rows) -> str:
    """A Markdown table from ``scripts/support_spread.py``'s rows (or its CSV's): one line per dataset, policy
    (label) and guidance scale, the seeds' runs averaged (the data's own row first)."""
    import statistics
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        w = "" if r["label"] == "data" else f"{float(r['guidance_scale']):g}"
        groups.setdefault((r["dataset"], r["label"] != "data", r["label"], float(w or 0), w), []).append(r)
    lines = ["| dataset | policy | w | seeds | episodes a seed | steps | RMS z | steps beyond 3 stds | score |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (ds, _, label, _, w), g in sorted(groups.items()):
        sc = [float(r["score_mean"]) for r in g]
        spread = f" +- {statistics.stdev(sc):.1f}" if len(sc) > 1 else ""
        seeds = ", ".join(str(r["seed"]) for r in g) if label != "data" else "—"
        lines.append(f"| {ds} | {label} | {w or '—'} | {seeds} | {g[0]['episodes']} "
                     f"| {sum(int(r['steps']) for r in g)} | {statistics.mean(float(r['z_rms']) for r in g):.2f} "
                     f"| {100 * statistics.mean(float(r['beyond3']) for r in g):.1f}% | {statistics.mean(sc):.1f}{spread} |")
    return "\n".join(lines) + "\n"


def render_support_spread(csv_path, figures_dir) -> list[Path]:
    """``support_spread.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    return _render_table(csv_path, SUPPORT_SPREAD_HEADER, support_spread_table, "scripts/support_spread.py")


CRITIC_ERRORS_COLUMNS = ("dataset", "run", "label", "critic", "seed", "guidance_scale", "group", "probes", "actions",
                         "z_rms", "true_adv", "critic_adv", "err_rms", "corr", "sign_agree", "critic_gain",
                         "oracle_gain", "noise", "horizon", "gamma", "continuation_noise", "rollouts", "episodes",
                         "seconds")
CRITIC_ERRORS_HEADER = (
    "# A run's critic against the exact action values, on and off the data's support\n\nAt states a trained "
    "policy visits (its evaluation episodes at guidance scale w), candidate actions are scored two ways: by the "
    "run's critic, and exactly, by running the simulator from that state (the action, then the policy that made the "
    "data, discounted; the `reference` column: that policy deterministic, or with the data's action noise averaged "
    "over that many rollouts, the data policy's own Q). Both as advantages over that policy's mean action mu(s) at "
    "the same state, in points of the dataset's score scale (the critic's Q in raw reward units: divided by the "
    "factor its training rewards were scaled by). Groups: the policy's own action; mu(s) + c x the "
    "data's noise std, c = 1 (the data's support) and c = 3 (mostly beyond it), clipped to the action box, which "
    "shortens offsets where mu(s) is near its edge (the `RMS z` column: the offset in data-noise stds). `sign "
    "right`: how often the critic says better / worse than mu(s) as the exact value does (0.5: a coin); `corr`: "
    "their correlation; `gain`: the exact advantage of the critic's pick among mu(s) and the group, per state, "
    "beside the exact pick's (`best`). Means over the seeds (runs) of each row (measured by "
    "`scripts/critic_errors.py` into `critic_errors.csv`; :func:`aepo_lite.rl.oracle.snapshot_q_errors`).\n\n")


def critic_errors_reference(row) -> str:
    """The exact values a ``scripts/critic_errors.py`` row (CSV dict) is measured against, in words."""
    cont = float(row.get("continuation_noise") or 0)
    return "deterministic" if cont == 0 else f"noise {cont:g}, {int(row['rollouts'])} rollouts"


def critic_errors_table(rows) -> str:
    """A Markdown table from ``scripts/critic_errors.py``'s rows (or its CSV's): one line per dataset, run label,
    critic, reference, w and candidate group, the seeds' runs averaged (probes summed)."""
    import statistics
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["label"], r["critic"], critic_errors_reference(r), float(r["guidance_scale"]),
                           r["group"]), []).append(r)
    lines = ["| dataset | run | critic | reference | w | group | seeds | probes | RMS z | exact adv. | critic adv. "
             "| RMS error | corr | sign right | gain | best |", "|---|---|---|---|---:|---|---|---:|" + "---:|" * 8]

    def m(g, k, fmt):
        return format(statistics.mean(float(r[k]) for r in g), fmt)
    for (ds, label, critic, ref, w, group), g in sorted(groups.items(), key=lambda kv: (*kv[0][:5], kv[0][5] !=
                                                                                       "policy", kv[0][5])):
        lines.append(f"| {ds} | {label} | {critic} | {ref} | {w:g} | {group} | {', '.join(str(r['seed']) for r in g)} "
                     f"| {sum(int(r['probes']) for r in g)} | {m(g, 'z_rms', '.2f')} | {m(g, 'true_adv', '.3f')} "
                     f"| {m(g, 'critic_adv', '.3f')} | {m(g, 'err_rms', '.3f')} | {m(g, 'corr', '.2f')} "
                     f"| {m(g, 'sign_agree', '.2f')} | {m(g, 'critic_gain', '.3f')} | {m(g, 'oracle_gain', '.3f')} |")
    return "\n".join(lines) + "\n"


def render_critic_errors(csv_path, figures_dir) -> list[Path]:
    """``critic_errors.md`` and ``critic_errors.png`` beside the CSV, from the CSV alone (``aepo-lite figures``).
    The plot: per run label, critic and reference, for each w and candidate group, what the critic's pick gains a
    state beside what the exact pick would (the seeds' mean), and how often the critic's sign is right (0.5: a
    coin)."""
    written = _render_table(csv_path, CRITIC_ERRORS_HEADER, critic_errors_table, "scripts/critic_errors.py")
    return written + [_plot_critic_errors(Path(csv_path))]


def _plot_critic_errors(csv_path: Path) -> Path:
    import statistics
    plt = _pyplot()
    rows = _csv_rows(csv_path)
    panels = sorted({(r["dataset"], r["label"], r["critic"], critic_errors_reference(r)) for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(5.6 * len(panels), 6.4), squeeze=False, sharey="row",
                             layout="constrained")
    for j, key in enumerate(panels):
        mine = [r for r in rows if (r["dataset"], r["label"], r["critic"], critic_errors_reference(r)) == key]
        cells = sorted({(float(r["guidance_scale"]), r["group"] != "policy", r["group"]) for r in mine})
        mean = {c: {k: statistics.mean(float(r[k]) for r in mine if (float(r["guidance_scale"]), r["group"]) ==
                                       (c[0], c[2])) for k in ("critic_gain", "oracle_gain", "sign_agree")}
                for c in cells}
        x = np.arange(len(cells))
        names = [f"w={w:g}\n{g}" for w, _, g in cells]
        top, bottom = axes[0, j], axes[1, j]
        top.bar(x - 0.2, [mean[c]["oracle_gain"] for c in cells], 0.4, color="0.7", label="the exact pick",
                gid="the exact pick")
        top.bar(x + 0.2, [mean[c]["critic_gain"] for c in cells], 0.4, color="C3", label="the critic's pick",
                gid="the critic's pick")
        top.axhline(0, color="0.3", linewidth=0.8)
        top.set_title(f"{key[0]}\n{key[1]}, {key[2]} critic\nagainst exact values: {key[3]}", fontsize=9)
        bottom.bar(x, [mean[c]["sign_agree"] for c in cells], 0.6, color="C0")
        bottom.axhline(0.5, color="0.3", linestyle=":", label="a coin (0.5)", gid="a coin")
        bottom.set_ylim(0, 1)
        for ax in (top, bottom):
            ax.set_xticks(x, names, fontsize=7)
    axes[0, 0].set_ylabel("advantage over mu(s) a state\n(points, mean over probes and seeds)")
    axes[1, 0].set_ylabel("share of signs the critic gets right")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    h2, l2 = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles + h2, labels + l2, loc="outside lower center", ncol=3, fontsize=8)
    return _save_plot(fig, csv_path.with_suffix(".png"))


def raw_q_fn(agent, data):
    """The agent's critic as ``q(observations (m, k), actions (m, d)) -> (m,)`` on raw observations and environment
    actions (scaled to its [-1, 1] box), in raw reward units: its Q divided by the factor its training rewards were
    scaled by, so it compares with simulator returns (antmaze's shifted rewards have no such factor: refused)."""
    if data.reward_scaling == "antmaze":
        raise ValueError("data: a run trained with reward_scaling antmaze (shifted rewards) has no Q in raw units")
    if agent.critic is None:
        raise ValueError("agent: has no critic")
    lo, hi, factor = agent.action_low, agent.action_high, data.reward_factor()

    @torch.no_grad()
    def q(obs, actions):
        unit = torch.as_tensor(2 * (np.asarray(actions) - lo) / (hi - lo) - 1, dtype=torch.float32, device=agent.device)
        return agent.critic.q_fn(agent.normalize(obs), unit).cpu().double().numpy() / factor
    return q


CRITIC_BUDGET_COLUMNS = ("dataset", "run", "critic", "variant", "seed", "steps", "guidance_scale", "group", "probes",
                         "actions", "true_adv", "critic_adv", "err_rms", "corr", "sign_agree", "critic_gain",
                         "oracle_gain", "horizon", "gamma", "episodes")
CRITIC_BUDGET_HEADER = (
    "# How a critic's ranking of actions grows with its training budget and size\n\nThe probes of "
    "`critic_errors.md` (states a trained run's policy visits at guidance scale w; candidates: its own action, mu(s) "
    "+ c x the data's noise std, c = 1 and 3; exact values by the simulator, the deterministic data policy after "
    "the action), recorded once; a critic with the run's settings, or a variant of them (the `variant` column: the "
    "critic fields changed), is trained afresh by the run's critic stage (its seed, batches and upstream stages) and "
    "scored on them after each number of steps. Columns as in `critic_errors.md`: `sign right` (0.5: a coin), "
    "`corr`, and `gain`, the exact advantage of the critic's pick among mu(s) and the group, per state, in points, "
    "beside the exact pick's (`best`). Measured by `scripts/critic_budget.py` into `critic_budget.csv`.\n\n")


def _ranking_table(rows, columns: tuple[str, str], key) -> str:
    """The critic-ranking tables' shape: a line per ``key(row)`` (a tuple, sorted; floats as %g) after the header
    ``columns`` ("| a | b |", its alignment "|---|---:|"); per candidate group its sign agreement, correlation and
    gain beside the best, a group missing from a line left blank."""
    head, align = columns
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault(key(r), {})[r["group"]] = r
    groups = _groups(rows)
    lines = [head + " " + " | ".join(f"{g}: sign right | corr | gain / best" for g in groups) + " |",
             align + "---:|---:|---:|" * len(groups)]
    for k, by in sorted(cells.items()):
        vals = []
        for g in groups:
            r = by.get(g)
            vals += (["", "", ""] if r is None else
                     [f"{float(r['sign_agree']):.2f}", f"{float(r['corr']):.2f}",
                      f"{float(r['critic_gain']):.3f} / {float(r['oracle_gain']):.3f}"])
        lines.append("| " + " | ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in k) + " | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def critic_budget_table(rows) -> str:
    """A Markdown table from ``scripts/critic_budget.py``'s rows (or its CSV's): one line per dataset, critic,
    variant, seed, steps and w; per candidate group its sign agreement, correlation and gain beside the best."""
    return _ranking_table(rows, ("| dataset | critic | variant | seed | steps | w |", "|---|---|---|---:|---:|---:|"),
                          lambda r: (r["dataset"], r["critic"], r["variant"], int(r["seed"]), int(r["steps"]),
                                     float(r["guidance_scale"])))


def render_critic_budget(csv_path, figures_dir) -> list[Path]:
    """``critic_budget.md`` and ``critic_budget.png`` beside the CSV, from the CSV alone (``aepo-lite figures``).
    The plot: per candidate group, the critic's pick's gain a state (top) and its share of right signs (bottom)
    against its training steps, a line per variant and w (solid, dashed, ... by w); the exact pick's gain in
    thick grey."""
    written = _render_table(csv_path, CRITIC_BUDGET_HEADER, critic_budget_table, "scripts/critic_budget.py")
    return written + [_plot_critic_budget(Path(csv_path))]


def _plot_critic_budget(csv_path: Path) -> Path:
    plt = _pyplot()
    rows = _csv_rows(csv_path)
    groups = _groups(rows)
    lines = sorted({(r["variant"], float(r["guidance_scale"])) for r in rows})
    variants, scales = sorted({v for v, _ in lines}), sorted({w for _, w in lines})
    fig, axes = plt.subplots(2, len(groups), figsize=(4.6 * len(groups), 6.4), squeeze=False, sharex=True,
                             sharey="row", layout="constrained")
    for j, g in enumerate(groups):
        top, bottom = axes[0, j], axes[1, j]
        for v, w in lines:
            mine = sorted((int(r["steps"]), r) for r in rows if (r["group"], r["variant"], float(r["guidance_scale"]))
                          == (g, v, w))
            x = [s for s, _ in mine]
            style = dict(color=f"C{variants.index(v)}", linestyle=("-", "--", "-.", ":")[scales.index(w) % 4],
                         marker="o", markersize=3)
            top.plot(x, [float(r["critic_gain"]) for _, r in mine],
                     label=f"{'the run' if v == 'run' else v}: critic's pick, w={w:g}",
                     gid=f"gain {v} w={w:g}", **style)
            bottom.plot(x, [float(r["sign_agree"]) for _, r in mine], gid=f"sign {v} w={w:g}", **style)
            if variants.index(v) == 0:
                top.plot(x, [float(r["oracle_gain"]) for _, r in mine], color="0.6", linewidth=2.5,
                         linestyle=style["linestyle"], label=f"the exact pick, w={w:g}", gid=f"best w={w:g}")
        top.axhline(0, color="0.3", linewidth=0.8)
        bottom.axhline(0.5, color="0.3", linewidth=0.8)
        top.set_title(g, fontsize=10)
        bottom.set_xscale("log")
        bottom.set_xlabel("critic training steps")
    axes[0, 0].set_ylabel("advantage over mu(s) of the pick\n(points a state)")
    axes[1, 0].set_ylabel("share of signs the critic gets right")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(f"{rows[0]['dataset']}: the critic's ranking of actions against its training budget", fontsize=10)
    return _save_plot(fig, csv_path.with_suffix(".png"))


CRITIC_DATA_COLUMNS = CRITIC_BUDGET_COLUMNS + ("train_dataset", "train_episodes", "transitions")
CRITIC_DATA_HEADER = (
    "# How a critic's ranking of actions grows with its data\n\nThe probes of `critic_budget.md` (states a trained "
    "run's policy visits at guidance scale w; candidates: its own action, mu(s) + c x the data's noise std, c = 1 and "
    "3; exact values by the simulator, the deterministic data policy after the action). A critic with the run's "
    "settings and seed (or of the kind in the `critic` column) is trained afresh on the first n episodes of a fixed "
    "random order of `train data` (a dataset of the same data policy, or of its snapshot with another action noise; "
    "nested: each subset holds the smaller ones) and scored after each number of steps. Critic `exact`: the "
    "Monte-Carlo critic regressed on the exact values of its transitions (the probes' definition, each (state, "
    "action) of the data run in the simulator) instead of their returns: the network's ranking when its targets "
    "carry no error; `exact+K`: the same with K more actions at each state (the data's action plus 1 or 3 noise "
    "stds of noise) and their exact values, data no offline method has; `-withinL`: batches of states with all "
    "their actions and L times the squared error of the values centered within each state added to the loss (an "
    "advantage fitted on within-state differences); `[field=value,...]`: critic settings changed from the run's "
    "(its network's size, say). Columns as in `critic_budget.md`: `sign right` (0.5: a coin), `corr`, and `gain`, the exact advantage of the "
    "critic's pick among mu(s) and the group, per state, in points, beside the exact pick's (`best`). Measured by "
    "`scripts/critic_data.py` into `critic_data.csv`.\n\n")


def critic_data_table(rows) -> str:
    """A Markdown table from ``scripts/critic_data.py``'s rows (or its CSV's): one line per training dataset,
    episodes, critic, steps and w; per candidate group its sign agreement, correlation and gain beside the best."""
    return _ranking_table(rows, ("| train data | episodes | transitions | critic | steps | w |",
                                 "|---|---:|---:|---|---:|---:|"),
                          lambda r: (r["train_dataset"], int(r["train_episodes"]), int(r["transitions"]), r["critic"],
                                     int(r["steps"]), float(r["guidance_scale"])))


def render_critic_data(csv_path, figures_dir) -> list[Path]:
    """``critic_data.md`` and ``critic_data.png`` beside the CSV, from the CSV alone (``aepo-lite figures``).
    The plot: per candidate group, the critic's share of right signs (top) and its correlation with the exact
    advantages (bottom) against its training transitions, a line per training dataset (marker), critic (colour) and
    w (solid, dashed, ...), each critic at its largest step count (the table holds every count)."""
    written = _render_table(csv_path, CRITIC_DATA_HEADER, critic_data_table, "scripts/critic_data.py")
    return written + [_plot_critic_data(Path(csv_path))]


CRITIC_FIT_COLUMNS = ("run", "variant", "critic", "steps", "split", "episodes", "states", "actions", "exact_spread",
                      "err_rms", "corr", "sign_agree")
CRITIC_FIT_HEADER = (
    "# Does the critic fit how the value changes with the action at its own training states?\n\nThe critics of "
    "`critic_data.md` trained with extra actions (`exact+K...`: each state of their training episodes seen with its "
    "data action and K more, all with exact values), scored after their last step on the 1 + K actions of each state, "
    "centered within the state: on their own training states (`train`) and on held-out episodes of the same dataset "
    "(`held-out`, the next episodes of the same random order, their extra actions drawn alike). `spread`: the RMS of "
    "the exact values centered within a state (raw reward units); `error`: the critic's RMS error on them (equal to "
    "the spread when it knows nothing of the action; 0 when it fits); `corr`: their correlation; `pairs right`: the "
    "share of a state's action pairs the critic orders as the exact values do (0.5: a coin). Measured by "
    "`scripts/critic_data.py` into `critic_data_fit.csv`.\n\n")


def critic_fit_table(rows) -> str:
    """A Markdown table from ``scripts/critic_data.py``'s fit rows: one line per critic and steps, the training
    states' and the held-out states' fit side by side."""
    lines = ["| critic | steps | split | episodes | states | actions | spread | error | corr | pairs right |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"train": 0, "held-out": 1}
    for r in sorted(rows, key=lambda r: (r["variant"], int(r["steps"]), order.get(r["split"], 2))):
        lines.append(f"| {r['critic']} | {int(r['steps'])} | {r['split']} | {int(r['episodes'])} | {int(r['states'])} | "
                     f"{int(r['actions'])} | {float(r['exact_spread']):.3f} | {float(r['err_rms']):.3f} | "
                     f"{float(r['corr']):.2f} | {float(r['sign_agree']):.3f} |")
    return "\n".join(lines) + "\n"


def render_critic_fit(csv_path, figures_dir) -> list[Path]:
    """``critic_data_fit.md`` and ``.png`` beside the CSV, from the CSV alone (``aepo-lite figures``): per critic
    (and steps), the share of action pairs ordered right and the centered error over the spread, on the training
    and the held-out states."""
    written = _render_table(csv_path, CRITIC_FIT_HEADER, critic_fit_table, "scripts/critic_data.py")
    plt = _pyplot()
    rows = _csv_rows(csv_path)
    names = sorted({(r["critic"], int(r["steps"])) for r in rows})
    splits = [s for s in ("train", "held-out") if any(r["split"] == s for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 2.4), sharey=True, layout="constrained")
    height = 0.8 / max(len(splits), 1)
    for k, split in enumerate(splits):
        mine = {(r["critic"], int(r["steps"])): r for r in rows if r["split"] == split}
        y = [i + (k - (len(splits) - 1) / 2) * height for i, n in enumerate(names) if n in mine]
        got = [mine[n] for n in names if n in mine]
        colour = ("tab:blue", "tab:orange")[k]
        axes[0].barh(y, [float(r["sign_agree"]) for r in got], height=height, color=colour, label=f"{split} states",
                     gid=f"pairs {split}")
        axes[1].barh(y, [float(r["err_rms"]) / float(r["exact_spread"]) for r in got], height=height, color=colour,
                     gid=f"error {split}")
    axes[0].axvline(0.5, color="0.3", linewidth=0.8)
    axes[1].axvline(1.0, color="0.3", linewidth=0.8)
    axes[0].set_yticks(range(len(names)), [f"{c}, {s} steps" for c, s in names], fontsize=8)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("action pairs ordered right (0.5: a coin)")
    axes[1].set_xlabel("centered error / exact spread (1: nothing known)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle("The critic's fit of how the value changes with the action, at its training states and held-out "
                 "ones", fontsize=10)
    return written + [_save_plot(fig, Path(csv_path).with_suffix(".png"))]


ACTION_GRADIENT_COLUMNS = ("dataset", "train_episodes", "states", "actions", "scales", "horizon", "gamma", "draws",
                           "linear_r2", "shuffled_r2", "cos_next", "cos_5", "cos_random", "cos_nearest", "nearest_dist",
                           "grad_p10", "grad_p50", "grad_p90", "grad_p99", "sensitivity", "cos_halves", "pairs_halves",
                           "cos_det", "pairs_det")
ACTION_GRADIENT_HEADER = (
    "# How the exact value changes with the action, state by state\n\nThe exact values of `critic_data_fit.md` "
    "(each training state's data action and K more, run in the simulator; `spreads`: the extra actions' noise "
    "multiples, cycled over them). At each state a least-squares plane is "
    "fitted to its 1 + K (action, value) pairs: `R2` is the share of the within-state variance it explains, pooled "
    "over states (`shuffled`: the same with each state's values shuffled among its actions, what a plane explains of "
    "values with no relation to the action; with 1 + K = d + 2 pairs a plane keeps one degree of freedom for the "
    "residual). Its slope g(s) is the direction in which the value rises. `cos`: the mean cosine between the slopes "
    "of a state and of the next state of its episode (`next`), of the state five steps on (`+5`), of a random other "
    "state (`random`), and of the nearest state of another episode in standardised observations (`nearest`, at a "
    "median distance `dist`). |g| quantiles in raw reward units per unit of the [-1, 1] action box. A critic learns g(s) only as far as "
    "it is a smooth function of the state. `1e-6 change`: the mean change of the exact value when the data's action "
    "moves by 1e-6 x N(0, I) (64 states): near 0 where the values are well posed; where it is large the closed loop "
    "is chaotic and the row measures that, not the action's effect. `draws`: 0 for the deterministic snapshot after "
    "the action; M for the data's own policy (the snapshot plus the data's action noise) after it, the mean of M noise "
    "sequences shared by all actions: the Q the critic learns, in expectation. `halves` (such rows): the cosine "
    "between the slopes of one state from two disjoint halves of the draws / the share of a state's action pairs the "
    "two halves order alike, how well M draws pin the slope down. `vs deterministic`: the same between these values "
    "and the deterministic snapshot's at the same pairs, how far the Q a critic learns agrees with the exact values "
    "that the critic tables score critics against. "
    "Measured by `scripts/exact_gradients.py` into `exact_gradients.csv`.\n\n")


def action_gradient_field(obs, actions, values, episodes, *, seed: int = 0, nearest: int = 800, halves=None,
                          reference=None) -> dict:
    """How exact values change with the action, state by state: ``obs`` (n, k), ``actions`` (n, m, d), ``values``
    (n, m), ``episodes`` (n,) the episode of each state (states of an episode in step order). Per state a
    least-squares plane value ~ c + g . (a - a_0); returns the pooled share of within-state variance it explains
    (``linear_r2``) beside that for each state's values shuffled among its actions (``shuffled_r2``), the mean cosine
    between slopes g one and five steps apart in an episode, of random pairs, and of each of ``nearest`` random
    states with the nearest state of another episode (standardised observations; ``nearest_dist`` the median
    distance), and quantiles of |g|. Needs m >= d + 2 (a residual left after the plane). ``halves``: two independent
    estimates of ``values`` (each (n, m); Monte-Carlo values from disjoint draws): ``cos_halves`` is the mean cosine
    between their slopes at the same state, ``pairs_halves`` the share of a state's action pairs both order alike
    (NaN without them). ``reference`` (n, m): other values of the same pairs (the deterministic continuation's):
    ``cos_det`` and ``pairs_det`` compare ``values`` with it alike."""
    obs, actions, values = np.asarray(obs, float), np.asarray(actions, float), np.asarray(values, float)
    episodes = np.asarray(episodes)
    n, m, d = actions.shape
    if m < d + 2:
        raise ValueError(f"actions: a plane in {d} action dimensions needs at least {d + 2} actions a state to leave a "
                         f"residual, got {m}")
    if values.shape != (n, m) or obs.shape[0] != n or episodes.shape != (n,):
        raise ValueError(f"values/obs/episodes: expected ({n}, {m}), ({n}, k) and ({n},), got {values.shape}, "
                         f"{obs.shape} and {episodes.shape}")
    rng = np.random.default_rng(seed)
    X = np.concatenate([np.ones((n, m, 1)), actions - actions[:, :1]], 2)  # (n, m, 1 + d)
    pinv = np.linalg.pinv(X)  # (n, 1 + d, m): each state's least-squares plane

    def planes(v):
        coef = np.einsum("njm,nm->nj", pinv, v)
        resid = v - np.einsum("nmj,nj->nm", X, coef)
        centered = v - v.mean(1, keepdims=True)
        return coef[:, 1:], 1 - (resid ** 2).sum() / (centered ** 2).sum()
    if halves is not None and (len(halves) != 2 or any(np.shape(h) != (n, m) for h in halves)):
        raise ValueError(f"halves: expected two ({n}, {m}) arrays, got {[np.shape(h) for h in halves]}")
    if reference is not None and np.shape(reference) != (n, m):
        raise ValueError(f"reference: expected a ({n}, {m}) array, got {np.shape(reference)}")
    iu, ju = np.triu_indices(m, 1)

    def pairs(u, w):  # the share of each state's action pairs that u and w order alike
        u, w = np.asarray(u, float), np.asarray(w, float)
        return float((np.sign(u[:, iu] - u[:, ju]) == np.sign(w[:, iu] - w[:, ju])).mean())
    g, r2 = planes(values)
    _, shuffled = planes(np.take_along_axis(values, rng.permuted(np.tile(np.arange(m), (n, 1)), axis=1), 1))

    def cos(u, w):
        return float(np.mean((u * w).sum(1) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(w, axis=1),
                                                         1e-300)))

    def lagged(k):
        same = episodes[k:] == episodes[:-k]
        return cos(g[k:][same], g[:-k][same]) if same.any() else float("nan")
    z = (obs - obs.mean(0)) / np.maximum(obs.std(0), 1e-12)
    near, dist = [], []
    for i in rng.choice(n, min(nearest, n), replace=False):
        dd = np.linalg.norm(z - z[i], axis=1)
        dd[episodes == episodes[i]] = np.inf
        if np.isfinite(dd).any():
            j = int(dd.argmin())
            near.append((i, j))
            dist.append(dd[j])
    size = np.linalg.norm(g, axis=1)
    i, j = np.array(near).T if near else (np.array([], int), np.array([], int))
    return {"states": n, "actions": m, "linear_r2": float(r2), "shuffled_r2": float(shuffled), "cos_next": lagged(1),
            "cos_5": lagged(5), "cos_random": cos(g, g[rng.permutation(n)]),
            "cos_nearest": cos(g[i], g[j]) if near else float("nan"),
            "nearest_dist": float(np.median(dist)) if dist else float("nan"),
            **{f"grad_p{q}": float(np.quantile(size, q / 100)) for q in (10, 50, 90, 99)},
            "cos_halves": cos(*(planes(np.asarray(h, float))[0] for h in halves)) if halves is not None else float("nan"),
            "pairs_halves": pairs(*halves) if halves is not None else float("nan"),
            "cos_det": cos(g, planes(np.asarray(reference, float))[0]) if reference is not None else float("nan"),
            "pairs_det": pairs(values, reference) if reference is not None else float("nan")}


def action_gradient_table(rows) -> str:
    """A Markdown table from ``scripts/exact_gradients.py``'s rows: one line per dataset and episodes."""
    lines = ["| dataset | episodes | states | actions | spreads | draws | R2 | shuffled R2 | cos next | cos +5 | cos random | "
             "cos nearest (dist) | abs g p10 / p50 / p90 / p99 | 1e-6 change | halves: cos / pairs | vs deterministic: "
             "cos / pairs |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], int(r["train_episodes"]), int(r["actions"]),
                                         [float(c) for c in str(r["scales"]).split()], int(r.get("draws") or 0))):
        f = {k: float("nan") if r.get(k) in (None, "") else float(r[k]) for k in ACTION_GRADIENT_COLUMNS[8:]}
        halves, det = ("" if np.isnan(f[f"cos_{k}"]) else f"{f[f'cos_{k}']:.3f} / {f[f'pairs_{k}']:.3f}"
                       for k in ("halves", "det"))
        lines.append(f"| {r['dataset']} | {int(r['train_episodes'])} | {int(r['states'])} | {int(r['actions'])} | "
                     f"{r['scales']} | {int(r.get('draws') or 0)} | "
                     f"{f['linear_r2']:.3f} | {f['shuffled_r2']:.3f} | {f['cos_next']:.3f} | {f['cos_5']:.3f} | "
                     f"{f['cos_random']:.3f} | {f['cos_nearest']:.3f} ({f['nearest_dist']:.2f}) | {f['grad_p10']:.3f} / "
                     f"{f['grad_p50']:.3f} / {f['grad_p90']:.2f} / {f['grad_p99']:.1f} | {f['sensitivity']:.2g} | "
                     f"{halves} | {det} |")
    return "\n".join(lines) + "\n"


def render_action_gradients(csv_path, figures_dir) -> list[Path]:
    """``exact_gradients.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    return _render_table(csv_path, ACTION_GRADIENT_HEADER, action_gradient_table, "scripts/exact_gradients.py")


def _plot_critic_data(csv_path: Path) -> Path:
    plt = _pyplot()
    rows = _csv_rows(csv_path)
    groups = _groups(rows)
    last = {}  # each critic's largest step count on each training dataset: the line drawn
    for r in rows:
        k = (r["train_dataset"], r["critic"])
        last[k] = max(last.get(k, 0), int(r["steps"]))
    lines = sorted({(r["train_dataset"], r["critic"], last[(r["train_dataset"], r["critic"])],
                     float(r["guidance_scale"])) for r in rows})
    datasets = sorted({d for d, *_ in lines})
    colours, scales = sorted({(c, s) for _, c, s, _ in lines}), sorted({w for *_, w in lines})
    palette = plt.get_cmap("tab10" if len(colours) <= 10 else "tab20")  # a colour per critic (and its steps)
    fig, axes = plt.subplots(2, len(groups), figsize=(4.6 * len(groups), 6.4), squeeze=False, sharex=True,
                             sharey="row", layout="constrained")
    for j, g in enumerate(groups):
        top, bottom = axes[0, j], axes[1, j]
        for ds, critic, steps, w in lines:
            mine = sorted((int(r["transitions"]), r) for r in rows
                          if (r["group"], r["train_dataset"], r["critic"], int(r["steps"]), float(r["guidance_scale"]))
                          == (g, ds, critic, steps, w))
            x = [n for n, _ in mine]
            style = dict(color=palette(colours.index((critic, steps)) % palette.N),
                         linestyle=("-", "--", "-.", ":")[scales.index(w) % 4],
                         marker="osD^v"[datasets.index(ds) % 5], markersize=3 if len(x) > 1 else 6)
            name = f"{critic}, {steps} steps, w={w:g}" + (f", {ds}" if len(datasets) > 1 else "")
            key = f"{critic} {steps} w={w:g}" + (f" {ds}" if len(datasets) > 1 else "")
            top.plot(x, [float(r["sign_agree"]) for _, r in mine], label=name, gid=f"sign {key}", **style)
            bottom.plot(x, [float(r["corr"]) for _, r in mine], gid=f"corr {key}", **style)
        top.axhline(0.5, color="0.3", linewidth=0.8)
        bottom.axhline(0, color="0.3", linewidth=0.8)
        top.set_title(g, fontsize=10)
        bottom.set_xscale("log")
        ticks = {}  # one tick per label: datasets of 199940 and 200000 transitions share "200k"
        for n in sorted({int(r["transitions"]) for r in rows}):
            ticks.setdefault(f"{n / 1000:.0f}k" if n >= 1000 else str(n), n)
        bottom.set_xticks(list(ticks.values()), list(ticks))
        bottom.minorticks_off()
        bottom.set_xlabel("the critic's training transitions")
    axes[0, 0].set_ylabel("share of signs the critic gets right")
    axes[1, 0].set_ylabel("correlation with the exact\nadvantages over mu(s)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4 if len(datasets) == 1 else 3, len(labels)),
               fontsize=8)
    fig.suptitle(f"{rows[0]['dataset']}: the critic's ranking of actions against its data (trained on "
                 f"{', '.join(datasets)})", fontsize=10)
    return _save_plot(fig, csv_path.with_suffix(".png"))


CRITIC_SEEDS_COLUMNS = ("dataset", "run", "critic", "steps", "guidance_scale", "group", "members", "probes", "actions",
                        "agree", "alone", "corr", "sign_agree", "critic_gain", "oracle_gain", "near_corr",
                        "true_near_corr", "horizon", "gamma", "episodes")
CRITIC_SEEDS_HEADER = (
    "# Critics alike but for their seed: do they err alike?\n\nThe probes of `critic_budget.md` (states a trained "
    "run's policy visits at guidance scale w; candidates: its own action, mu(s) + c x the data's noise std, c = 1 and "
    "3; exact values by the simulator). The run's critic stage is trained M times, each with its own seed (its "
    "networks' initialisation and its batches; seed 0 is the run's own critic), on the same data and settings. Per "
    "candidate group, as advantages over mu(s) at the same state: `critics agree`, the mean correlation between "
    "two of the M critics; `each alone`, the mean correlation of one critic with the exact values; then the mean of "
    "the first n critics' Q taken as one critic: its correlation with the exact values, its `sign right` (0.5: a "
    "coin) and `gain`, the exact advantage of its pick among mu(s) and the group, per state, in points, beside the "
    "exact pick's (`best`); `near mu(s)`, the correlation of the average's advantages, and of the exact ones, with "
    "the action's nearness to mu(s) (-|a - mu(s)|^2 in units of the data's noise std): how much each favours "
    "actions close to the data policy's mean. Whatever error the critics share, averaging them cannot remove; "
    "critics that agree with each other more than with the exact values have such a shared part. "
    "Measured by `scripts/critic_seeds.py` into `critic_seeds.csv`.\n\n")


def member_counts(m: int) -> list[int]:
    """How many critics :func:`critic_seed_rows` averages: 1, 2, 4, ... below ``m``, then ``m``."""
    return [2**i for i in range(max(m - 1, 1).bit_length()) if 2**i < m] + [m]


def critic_seed_rows(probes, q_hats) -> list[dict]:
    """``q_hats``: M >= 2 critics' Q on ``probes`` (each (P * C,) in the order :func:`q_error_rows` asks for, raw
    reward units), trained alike but for their seed. Per candidate group and n in :func:`member_counts`: the row of
    the mean of the first n critics' Q scored as one critic (:func:`aepo_lite.rl.oracle.q_error_rows`), with
    ``members`` n, ``agree`` the mean correlation between two critics' advantages over mu(s) and ``alone`` the mean
    correlation of one critic's with the exact advantages (both over all M critics)."""
    from aepo_lite.rl.oracle import q_error_rows
    P, C, _ = probes.actions.shape
    qs = [np.asarray(q, np.float64).reshape(-1) for q in q_hats]
    if len(qs) < 2:
        raise ValueError(f"q_hats: expected the Q of 2 or more critics, got {len(qs)}")
    if any(q.size != P * C or not np.all(np.isfinite(q)) for q in qs):
        raise ValueError(f"q_hats: expected {P * C} finite values per critic, got sizes {[q.size for q in qs]}")
    qs = [q.reshape(P, C) for q in qs]
    m, pairs = len(qs), np.triu_indices(len(qs), 1)
    spread = {}
    for g, idx in probes.groups:
        adv = [(q[:, idx] - q[:, :1]).ravel() for q in qs]
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.corrcoef(np.stack(adv + [(probes.q_true[:, idx] - probes.q_true[:, :1]).ravel()]))
        spread[g] = {"agree": float(c[:m, :m][pairs].mean()), "alone": float(c[:m, m].mean())}
    rows = []
    for n in member_counts(m):
        mean = np.mean(qs[:n], axis=0).reshape(-1)
        rows += [dict(r, members=n, **spread[r["group"]]) for r in q_error_rows(probes, lambda o, a: mean)]
    return rows


def critic_seeds_table(rows) -> str:
    """A Markdown table from ``scripts/critic_seeds.py``'s rows (or its CSV's): one line per dataset, critic, steps,
    w and number of critics averaged; per candidate group the critics' agreement, one critic's correlation with the
    exact values, the average's correlation, sign agreement and gain beside the best, and the average's and the exact
    advantages' correlation with nearness to mu(s)."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        key = (r["dataset"], r["critic"], int(r["steps"]), float(r["guidance_scale"]), int(r["members"]))
        cells.setdefault(key, {})[r["group"]] = r
    groups = _groups(rows)
    lines = ["| dataset | critic | steps | w | critics averaged | " + " | ".join(
        f"{g}: critics agree | each alone | corr | sign right | gain / best | near mu(s): mean / exact"
        for g in groups) + " |",
        "|---|---|---:|---:|---:|" + "---:|---:|---:|---:|---:|---:|" * len(groups)]
    for (ds, critic, steps, w, n), by in sorted(cells.items()):
        vals = []
        for g in groups:
            r = by.get(g)
            vals += ([""] * 6 if r is None else
                     [f"{float(r['agree']):.2f}", f"{float(r['alone']):.2f}", f"{float(r['corr']):.2f}",
                      f"{float(r['sign_agree']):.2f}", f"{float(r['critic_gain']):.3f} / {float(r['oracle_gain']):.3f}",
                      f"{float(r['near_corr']):.2f} / {float(r['true_near_corr']):.2f}"])
        lines.append(f"| {ds} | {critic} | {steps} | {w:g} | {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def render_critic_seeds(csv_path, figures_dir) -> list[Path]:
    """``critic_seeds.md`` and ``critic_seeds.png`` beside the CSV, from the CSV alone (``aepo-lite figures``).
    The plot: per candidate group, the correlation with the exact advantages of the mean of n critics against n, a
    line per w; dashed at the same colour, how well two of the critics agree with each other."""
    written = _render_table(csv_path, CRITIC_SEEDS_HEADER, critic_seeds_table, "scripts/critic_seeds.py")
    return written + [_plot_critic_seeds(Path(csv_path))]


def _plot_critic_seeds(csv_path: Path) -> Path:
    plt = _pyplot()
    rows = _csv_rows(csv_path)
    groups = _groups(rows)
    scales = sorted({float(r["guidance_scale"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False, sharey=True,
                             layout="constrained")
    for j, g in enumerate(groups):
        ax = axes[0, j]
        for i, w in enumerate(scales):
            mine = sorted((int(r["members"]), r) for r in rows if r["group"] == g and float(r["guidance_scale"]) == w)
            x = [n for n, _ in mine]
            ax.plot(x, [float(r["corr"]) for _, r in mine], color=f"C{i}", marker="o", markersize=3,
                    label=f"mean of n critics vs the exact values, w={w:g}", gid=f"corr w={w:g}")
            ax.plot(x, [float(r["agree"]) for _, r in mine], color=f"C{i}", linestyle="--",
                    label=f"two critics with each other, w={w:g}", gid=f"agree w={w:g}")
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ns = sorted({int(r["members"]) for r in rows})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_title(g, fontsize=10)
        ax.set_xlabel("critics averaged (seeds)")
    axes[0, 0].set_ylabel("correlation of advantages over mu(s)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle(f"{rows[0]['dataset']}: critics that differ only in their seed", fontsize=10)
    return _save_plot(fig, csv_path.with_suffix(".png"))
