"""``aepo-lite figures``: regenerate every figure and table in ``figures/`` from the saved results
there, without training anything.

Each part of the course has one renderer, reading one results file:

==================  ===========================  ==========================================
part                results file (in figures/)   renderer
==================  ===========================  ==========================================
closed-form demo    closed_form_checks.json      ``aepo_lite.course.demo.render`` (exact Gaussian
                                                 guidance: sampling, no training, seconds)
toy 2D tasks        toy2d_results.csv            ``aepo_lite.toy.report.render``
toy 2D, long grid   toy2d_long.csv (optional)    the same, into ``figures/toy2d_long/``
toy 2D, 16000 steps toy2d_xlong.csv (optional)   the same, into ``figures/toy2d_xlong/``
toy 2D, 32000 steps toy2d_xxlong.csv (optional)  the same, into ``figures/toy2d_xxlong/``
offline RL          rl_results.csv               ``aepo_lite.rl.report.render``
offline RL, 6c      rl_6c.csv (optional)         the same, into ``figures/rl_6c/``
offline RL, LN      rl_6c_ln.csv (optional)      the same, into ``figures/rl_6c_ln/``
offline RL, Reacher rl_6c_heldout.csv (opt.)     the same, into ``figures/rl_6c_heldout/``
offline RL, energy  rl_6c_big.csv (optional)     the same, into ``figures/rl_6c_big/`` (a 256 x 3 energy)
Reacher, energy     rl_6c_heldout_big.csv (o.)   the same, into ``figures/rl_6c_heldout_big/``
best-of-N guided    rl_6c_big/selection.csv (o.) the same, into ``figures/rl_6c_big/selection/`` (Hopper medium)
guidance size by t  rl_6c/energy_gradients.csv   ``aepo_lite.rl.diagnostics.render`` (optional)
guidance by Q       rl_6c_ln/guided_q.csv (opt.) ``aepo_lite.rl.diagnostics.render_guided_q``
energy fit, RL      rl_6c_ln/energy_fit.csv (o.) ``aepo_lite.rl.diagnostics.render_energy_fit``
energy fit, larger  rl_6c_big/energy_fit.csv (o.) the same
mixture h, RL       rl_6c_big/mixture_bandwidth.csv ``aepo_lite.rl.diagnostics.render_mixture_bandwidth`` (o.)
policy with noise   rl_6c_ln/policy_noise.csv    ``aepo_lite.rl.diagnostics.render_policy_noise`` (opt.)
support oracle      rl_6c_ln/support_oracle.csv  ``aepo_lite.rl.diagnostics.render_support_oracle`` (opt.)
action spread       rl_6c_big/support_spread.csv ``aepo_lite.rl.diagnostics.render_support_spread`` (opt.)
critic vs exact Q   rl_6c_big/critic_errors.csv  ``aepo_lite.rl.diagnostics.render_critic_errors`` (opt.)
critic by budget    rl_6c_big/critic_budget.csv  ``aepo_lite.rl.diagnostics.render_critic_budget`` (opt.)
critic by seed      rl_6c_big/critic_seeds.csv   ``aepo_lite.rl.diagnostics.render_critic_seeds`` (opt.)
critic by data      rl_6c_big/critic_data.csv    ``aepo_lite.rl.diagnostics.render_critic_data`` (opt.)
critic's own fit    rl_6c_big/critic_data_fit.csv ``aepo_lite.rl.diagnostics.render_critic_fit`` (opt.)
exact value's slope rl_6c_big/exact_gradients.csv ``aepo_lite.rl.diagnostics.render_action_gradients`` (o.)
toy error budget    toy2d_budget.csv (optional)  ``aepo_lite.toy.budget.render``
toy budget, runs    toy2d_budget_runs.csv (opt.) ``aepo_lite.toy.trained_budget.render`` (parts 4-5)
toy convergence     toy2d_convergence.csv (opt.) ``aepo_lite.toy.convergence.render``
toy fitted critic   toy2d_convergence_critic.csv ``aepo_lite.toy.convergence.render_critic`` (optional)
toy plateau parts   toy2d_plateau.csv (optional) ``aepo_lite.toy.plateau.render`` (part 4 without draw noise)
toy floor by seed   toy2d_floor_spread.csv (opt.) ``aepo_lite.toy.floors.render``
toy eval noise      toy2d_eval_noise.csv (opt.)  ``aepo_lite.toy.eval_noise.render``
mixture bandwidth   toy2d_mixture_bandwidth.csv  ``scripts/mixture_bandwidth.py``'s ``render`` (optional)
toy critic budget   toy2d_critic_steps.csv (opt.) ``aepo_lite.toy.critic_steps.render``
behaviour's share   toy2d_behaviour_share.csv    ``scripts/behaviour_share.py``'s ``render`` (optional)
speed benchmark     bench_*.json (optional)      ``aepo_lite.bench.to_markdown``
QGPO comparison     compare_qgpo_*.json          ``scripts/compare_qgpo.py``'s ``to_markdown``
                    (optional)                   (timings measured there, tabulated here)
results summary     the two CSVs above           ``aepo_lite.course.summary.render``: the README's
                                                 summary, docs/results.md's toy and RL tables
==================  ===========================  ==========================================

A missing results file is reported (with the command that makes it) and the other parts still
render; so is a renderer that fails, by name. The exit status is 0 only when every part rendered.
Renderers are deterministic (fixed figure metadata, seeded sampling): unchanged results give
unchanged bytes, so the command leaves a clean git tree.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# What counts as "a figure or table" in figures/ (the rest, .csv and .json, are results).
OUTPUT_SUFFIXES = (".png", ".svg", ".pdf", ".md")


@dataclass(frozen=True)
class Part:
    name: str        # what the reader calls this part of the course
    module: str      # the library module holding its renderer, or a repository script ("scripts/x.py")
    results: str     # the results file it reads, relative to the figures folder (a glob when optional)
    made_by: str     # the command that (re)makes the results file (it trains, measures or collects runs)
    render: Callable  # (module, results_path, figures_dir) -> list of paths written
    optional: bool = False  # True: results may be absent (then there is nothing to render)


def _render_demo(mod, results: Path, figures_dir: Path) -> list[Path]:
    return list(mod.render(results, figures_dir))


def _render_report(mod, results: Path, figures_dir: Path) -> list[Path]:
    return list(mod.render(results, figures_dir))


def _render_into(folder: str):
    """A report rendered into its own folder of ``figures_dir`` (one per extra grid or protocol run)."""
    return lambda mod, results, figures_dir: list(mod.render(results, Path(figures_dir) / folder))


def _render_markdown_of_json(mod, results: Path, figures_dir: Path) -> list[Path]:
    """A timing table (``X.json`` -> ``X.md``) by the measuring module's own ``to_markdown``."""
    from aepo_lite._io import atomic_write_text, read_json

    return [atomic_write_text(Path(figures_dir) / (results.stem + ".md"), mod.to_markdown(read_json(results)))]


def _load_script(rel: str, figures_dir: Path):
    """A repository script as a module (it lives beside figures/, or beside the package)."""
    import importlib.util

    for base in (Path(figures_dir).resolve().parent, Path(__file__).resolve().parents[2]):
        path = base / rel
        if path.is_file():
            spec = importlib.util.spec_from_file_location(Path(rel).stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise ModuleNotFoundError(f"no {rel} beside {figures_dir} or the package", name=rel)


PARTS = (
    Part("closed-form demo", "aepo_lite.course.demo", "closed_form_checks.json", "aepo-lite demo --out figures", _render_demo),
    Part("toy 2D tasks", "aepo_lite.toy.report", "toy2d_results.csv", "aepo-lite toy-grid", _render_report),
    Part("toy 2D tasks, long grid", "aepo_lite.toy.report", "toy2d_long.csv",
         "aepo-lite toy-grid --preset long (docs/results.md)",
         _render_into("toy2d_long"), optional=True),
    Part("toy 2D tasks, 16000-step grid", "aepo_lite.toy.report", "toy2d_xlong.csv",
         "aepo-lite toy-grid --preset xlong (docs/results.md)",
         _render_into("toy2d_xlong"), optional=True),
    Part("toy 2D tasks, 32000-step grid", "aepo_lite.toy.report", "toy2d_xxlong.csv",
         "aepo-lite toy-grid --preset xxlong (docs/results.md)",
         _render_into("toy2d_xxlong"), optional=True),
    Part("offline RL", "aepo_lite.rl.report", "rl_results.csv",
         "aepo-lite rl-results --runs RUNS --csv figures/rl_results.csv", _render_report),
    Part("offline RL, 6c protocol", "aepo_lite.rl.report", "rl_6c.csv",
         "aepo-lite rl-results --runs runs/rl6c --csv figures/rl_6c.csv --figures figures/rl_6c (docs/results.md)",
         _render_into("rl_6c"), optional=True),
    Part("offline RL, 6c protocol, LayerNorm critic", "aepo_lite.rl.report", "rl_6c_ln.csv",
         "aepo-lite rl-results --runs runs/rl6c-ln --csv figures/rl_6c_ln.csv --figures figures/rl_6c_ln (docs/results.md)",
         _render_into("rl_6c_ln"), optional=True),
    Part("offline RL, 6c protocol, a larger energy", "aepo_lite.rl.report", "rl_6c_big.csv",
         "aepo-lite rl-results --runs runs/rl6c-big --csv figures/rl_6c_big.csv --figures figures/rl_6c_big (docs/results.md)",
         _render_into("rl_6c_big"), optional=True),
    Part("offline RL, 6c protocol, held-out", "aepo_lite.rl.report", "rl_6c_heldout.csv",
         "aepo-lite rl-results --runs runs/rl6c-heldout --csv figures/rl_6c_heldout.csv --figures figures/rl_6c_heldout",
         _render_into("rl_6c_heldout"), optional=True),
    Part("offline RL, 6c protocol, held-out, a larger energy", "aepo_lite.rl.report", "rl_6c_heldout_big.csv",
         "aepo-lite rl-results --runs runs/rl6c-heldout-big --csv figures/rl_6c_heldout_big.csv "
         "--figures figures/rl_6c_heldout_big (docs/results.md)",
         _render_into("rl_6c_heldout_big"), optional=True),
    Part("offline RL, guidance with the critic's best-of-N", "aepo_lite.rl.report", "rl_6c_big/selection.csv",
         "aepo-lite rl-results --runs RUNS --csv figures/rl_6c_big/selection.csv --figures figures/rl_6c_big/selection "
         "(docs/results.md)", _render_into("rl_6c_big/selection"), optional=True),
    Part("offline RL, guidance size by t", "aepo_lite.rl.diagnostics", "rl_6c/energy_gradients.csv",
         "python scripts/energy_gradients.py --runs RUN ... --out figures/rl_6c/energy_gradients.csv (docs/results.md)",
         _render_report, optional=True),
    Part("offline RL, where guidance goes by Q", "aepo_lite.rl.diagnostics", "rl_6c_ln/guided_q.csv",
         "python scripts/guided_q.py --runs RUN ... --out figures/rl_6c_ln/guided_q.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_guided_q(results, figures_dir), optional=True),
    Part("offline RL, how well the energies follow E_t", "aepo_lite.rl.diagnostics", "rl_6c_ln/energy_fit.csv",
         "python scripts/energy_fit.py --runs RUN ... --out figures/rl_6c_ln/energy_fit.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_energy_fit(results, figures_dir), optional=True),
    Part("offline RL, how well the larger energies follow E_t", "aepo_lite.rl.diagnostics", "rl_6c_big/energy_fit.csv",
         "python scripts/energy_fit.py --runs RUN ... --out figures/rl_6c_big/energy_fit.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_energy_fit(results, figures_dir), optional=True),
    Part("offline RL, the mixture target's bandwidth", "aepo_lite.rl.diagnostics", "rl_6c_big/mixture_bandwidth.csv",
         "python scripts/energy_fit.py --runs RUN ... --mixture-bandwidths H ... --out "
         "figures/rl_6c_big/mixture_bandwidth.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_mixture_bandwidth(results, figures_dir), optional=True),
    Part("offline RL, a dataset's own policy with action noise", "aepo_lite.rl.diagnostics",
         "rl_6c_ln/policy_noise.csv",
         "python scripts/policy_noise.py --datasets DATASET --out figures/rl_6c_ln/policy_noise.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_policy_noise(results, figures_dir), optional=True),
    Part("offline RL, the best of N in-support actions by the true return", "aepo_lite.rl.diagnostics",
         "rl_6c_ln/support_oracle.csv",
         "python scripts/support_oracle.py --datasets DATASET --out figures/rl_6c_ln/support_oracle.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_support_oracle(results, figures_dir), optional=True),
    Part("offline RL, how far from the data's actions trained runs act", "aepo_lite.rl.diagnostics",
         "rl_6c_big/support_spread.csv",
         "python scripts/support_spread.py --runs RUN ... --out figures/rl_6c_big/support_spread.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_support_spread(results, figures_dir), optional=True),
    Part("offline RL, a run's critic against the exact action values", "aepo_lite.rl.diagnostics",
         "rl_6c_big/critic_errors.csv",
         "python scripts/critic_errors.py --runs RUN ... --out figures/rl_6c_big/critic_errors.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_critic_errors(results, figures_dir), optional=True),
    Part("offline RL, a critic's ranking of actions against its training steps and size", "aepo_lite.rl.diagnostics",
         "rl_6c_big/critic_budget.csv",
         "python scripts/critic_budget.py --run RUN --variants ... --out figures/rl_6c_big/critic_budget.csv "
         "(docs/results.md)", lambda mod, results, figures_dir: mod.render_critic_budget(results, figures_dir),
         optional=True),
    Part("offline RL, critics alike but for their seed", "aepo_lite.rl.diagnostics", "rl_6c_big/critic_seeds.csv",
         "python scripts/critic_seeds.py --run RUN --members 8 --out figures/rl_6c_big/critic_seeds.csv "
         "(docs/results.md)", lambda mod, results, figures_dir: mod.render_critic_seeds(results, figures_dir),
         optional=True),
    Part("offline RL, a critic's ranking of actions against its data", "aepo_lite.rl.diagnostics",
         "rl_6c_big/critic_data.csv",
         "python scripts/critic_data.py --run RUN --dataset DATASET --train-episodes N ... --out "
         "figures/rl_6c_big/critic_data.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_critic_data(results, figures_dir), optional=True),
    Part("offline RL, a critic's fit of the action's effect at its own training states", "aepo_lite.rl.diagnostics",
         "rl_6c_big/critic_data_fit.csv",
         "python scripts/critic_data.py --run RUN --dataset DATASET --train-episodes N --critic-kind exact "
         "--extra-actions K --out figures/rl_6c_big/critic_data.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_critic_fit(results, figures_dir), optional=True),
    Part("offline RL, how the exact value changes with the action, state by state", "aepo_lite.rl.diagnostics",
         "rl_6c_big/exact_gradients.csv",
         "python scripts/exact_gradients.py --dataset DATASET --train-episodes N --extra-actions K --out "
         "figures/rl_6c_big/exact_gradients.csv (docs/results.md)",
         lambda mod, results, figures_dir: mod.render_action_gradients(results, figures_dir), optional=True),
    Part("results summary", "aepo_lite.course.summary", "toy2d_results.csv",
         "the toy and RL results above", lambda mod, results, figures_dir: mod.render(figures_dir), optional=True),
    Part("toy error budget", "aepo_lite.toy.budget", "toy2d_budget.csv",
         "python scripts/toy_budget.py --n-ref-data 10000 --grid-size 24 --behaviour-steps 1500", _render_report,
         optional=True),
    Part("toy error budget, trained runs", "aepo_lite.toy.trained_budget", "toy2d_budget_runs.csv",
         "aepo-lite toy-grid --preset long --budget-csv figures/toy2d_budget_runs.csv", _render_report,
         optional=True),
    Part("toy energy convergence", "aepo_lite.toy.convergence", "toy2d_convergence.csv",
         "aepo-lite toy-convergence", _render_report, optional=True),
    Part("toy energy convergence, fitted critic", "aepo_lite.toy.convergence", "toy2d_convergence_critic.csv",
         "aepo-lite toy-convergence --critic regression",
         lambda mod, results, figures_dir: mod.render_critic(results, Path(figures_dir) / "toy2d_convergence.csv",
                                                             figures_dir), optional=True),
    Part("toy plateau, the regression part without draw noise", "aepo_lite.toy.plateau", "toy2d_plateau.csv",
         "python scripts/plateau_budget.py --runs RUN ... --cache-dir CACHE --ks K ...", _render_report,
         optional=True),
    Part("toy noise floor by seed", "aepo_lite.toy.floors", "toy2d_floor_spread.csv",
         "python scripts/floor_spread.py", _render_report, optional=True),
    Part("toy evaluation noise", "aepo_lite.toy.eval_noise", "toy2d_eval_noise.csv",
         "python scripts/eval_noise.py", _render_report, optional=True),
    Part("toy mixture posterior's bandwidth", "scripts/mixture_bandwidth.py", "toy2d_mixture_bandwidth.csv",
         "python scripts/mixture_bandwidth.py --out figures/toy2d_mixture_bandwidth.csv", _render_report,
         optional=True),
    Part("toy fitted critic by its steps", "aepo_lite.toy.critic_steps", "toy2d_critic_steps.csv",
         "python scripts/toy_critic_steps.py --csv figures/toy2d_critic_steps.csv", _render_report, optional=True),
    Part("toy sampler part: behaviour model or sampler", "scripts/behaviour_share.py", "toy2d_behaviour_share.csv",
         "python scripts/behaviour_share.py --behaviour-steps ... --csv figures/toy2d_behaviour_share.csv",
         _render_report, optional=True),
    Part("speed benchmark", "aepo_lite.bench", "bench_*.json",
         "aepo-lite bench --out figures/bench_<device>.json", _render_markdown_of_json, optional=True),
    Part("QGPO code comparison", "scripts/compare_qgpo.py", "compare_qgpo_*.json",
         "python scripts/compare_qgpo.py --qgpo CHECKOUT --out figures/compare_qgpo_<device>",
         _render_markdown_of_json, optional=True),
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "figures", help="regenerate every figure and table in figures/ from the saved results (no training)",
        description="Rebuild the course's figures and tables from the results files committed in the figures "
                    "folder (closed_form_checks.json, toy2d_results.csv, rl_results.csv). Nothing is trained.")
    p.add_argument("--figures-dir", type=Path, default=Path("figures"),
                   help="folder holding the results files; the figures and tables are written there (default: figures)")
    p.set_defaults(func=run)


def render_all(figures_dir: Path, parts=PARTS, out=None, err=None) -> tuple[list[Path], list[str]]:
    """Render every part; returns (paths written, problems). Problems are also printed to ``err``."""
    out, err = out or sys.stdout, err or sys.stderr
    figures_dir = Path(figures_dir)
    written: list[Path] = []
    problems: list[str] = []
    for part in parts:
        found = sorted(figures_dir.glob(part.results)) if part.optional else [figures_dir / part.results]
        found = [p for p in found if p.is_file()]
        if not found:
            if not part.optional:
                problems.append(f"{part.name}: no results file {figures_dir / part.results} (it is made by "
                                f"`{part.made_by}`; commit it, then run `aepo-lite figures` again)")
                print(f"aepo-lite figures: {problems[-1]}", file=err)
            continue
        try:
            if part.module.endswith(".py"):
                mod = _load_script(part.module, figures_dir)
            else:
                mod = importlib.import_module(part.module)
        except ModuleNotFoundError as e:
            if e.name != part.module:
                raise
            problems.append(f"{part.name}: the renderer module {part.module} is not in this version of aepo_lite")
            print(f"aepo-lite figures: {problems[-1]}", file=err)
            continue
        for results in found:
            t0 = time.perf_counter()
            try:
                paths = [Path(p) for p in part.render(mod, results, figures_dir)]
            except Exception as e:  # a renderer's bug must name the renderer, and not stop the others
                where = traceback.extract_tb(e.__traceback__)[-1]
                problems.append(f"{part.name}: the renderer in {part.module} failed on {results}: "
                                f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})")
                print(f"aepo-lite figures: {problems[-1]}", file=err)
                continue
            written += paths
            print(f"{part.name}: {results} -> " + ", ".join(p.name for p in paths)
                  + f" ({time.perf_counter() - t0:.1f} s)", file=out, flush=True)
    return written, problems


def unmade_outputs(figures_dir: Path, written: list[Path]) -> list[Path]:
    """Figures and tables in ``figures_dir`` that no renderer wrote (nothing regenerates them)."""
    done = {Path(p).resolve() for p in written}
    return sorted(p for p in Path(figures_dir).iterdir()
                  if p.suffix in OUTPUT_SUFFIXES and p.is_file() and p.resolve() not in done)


def run(args) -> int:
    figures_dir = Path(args.figures_dir)
    if not figures_dir.is_dir():
        print(f"aepo-lite figures: error: {figures_dir} is not a folder (pass --figures-dir, the folder "
              "holding the results files)", file=sys.stderr)
        return 2
    needed = [part for part in PARTS if not part.optional]
    if not any((figures_dir / part.results).is_file() for part in needed):  # the wrong folder: one line, not three
        print(f"aepo-lite figures: error: {figures_dir} holds none of the results files ("
              + ", ".join(f"{part.results}, made by `{part.made_by}`" for part in needed)
              + "): pass --figures-dir, the folder holding them", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    written, problems = render_all(figures_dir)
    for p in unmade_outputs(figures_dir, written):
        print(f"aepo-lite figures: warning: {p} is not made by any renderer, so this command does not "
              "regenerate it", file=sys.stderr)
    print(f"aepo-lite figures: wrote {len(written)} files in {figures_dir} in {time.perf_counter() - t0:.1f} s"
          + (f"; {len(problems)} part(s) not rendered" if problems else ""))
    return 1 if problems else 0
