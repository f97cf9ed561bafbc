"""Side by side: QGPO's official code (thu-ml/CEP-energy-guided-diffusion) against aepo_lite, per-step
times of behaviour training, critic and energy training and guided sampling, at the same network
and batch sizes, in one process on one machine, interleaved.

    python scripts/compare_qgpo.py --qgpo /path/to/CEP-energy-guided-diffusion [--device cpu] [--threads 1]
                                   [--rounds 7] [--quick] [--out figures/compare_qgpo_cpu]
    python scripts/compare_qgpo.py --dry-run [--quick]     # aepo_lite's side only: checks it runs

It fetches nothing: ``--qgpo`` is a checkout you made (``git clone``), used unmodified. Only its
model files are imported (``Offline_RL_2D/diffusion_SDE``, and ``dataset/dataset.py`` for the row that
times its DataLoader); the modules those files import at the top but never use here (gym, d4rl,
sklearn, and scipy, whose ``softmax`` model.py imports and then shadows with ``nn.Softmax``) are
stubbed with empty ``sys.modules`` entries when they are not installed. Its device comes from its
own ``args.device``, which this script sets, and one run-time patch: its ``schedule.marginal_prob_std``
defaults to ``device="cuda"`` (called so in ``update_qt``), so the module attribute is replaced by the
same function bound to the chosen device. No file of it is changed or copied.

What is timed (Hopper shapes: state 11, action 3; K = 16 support actions):
  behaviour   QGPO: its ``train_behavior`` loop body (``loss_fn`` on ScoreNet, Adam lr 1e-4), batch 4096;
              aepo_lite: ``BehaviourLearner.step`` on a NoiseNet with QGPO's parameter count (and the
              library default, smaller), Adam lr 1e-4.
  critic      QGPO: ``QGPO_Critic.update_q0`` (in-support softmax target over K next actions), batch 256;
              aepo_lite: ``critics.InSupportCritic.step`` (the same target), TwinQ 3 x 256 with QGPO's
              ReLU, and a second row with aepo_lite's smooth critic (SiLU) against the same QGPO step.
  energy      QGPO: ``QGPO_Critic.update_qt`` with method CEP, batch 256 x K;
              aepo_lite: ``EnergyLearner.step`` (method qgpo: CEP) with support Q from the target critic,
              EnergyNet 4 x 256.
              Also aepo_lite's AEPO update (a different algorithm: no support actions) for context.
  sampling    QGPO: ``ScoreNet.select_actions`` (DPM-Solver++ singlestep order 2, 15 steps, guidance
              scale 1), numpy states in, numpy actions out; aepo_lite: ``DiffusionModel.sample``
              (dpmpp2m, 15 steps, energy guidance, scale 1), numpy in and out.

Each round times every pair once, QGPO then aepo_lite on even rounds and the reverse on odd rounds
(each timing is a loop of calls lasting about ``--min-time`` seconds, synchronised at its ends);
the table gives the median seconds per call over rounds and the ratio QGPO / aepo_lite (> 1:
aepo_lite is faster), with the median of the per-round ratios next to it.
"""
from __future__ import annotations

import argparse
import functools
import importlib.machinery
import importlib.util
import json
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aepo_lite import bench  # noqa: E402
from aepo_lite.config import CriticConfig, EnergyConfig  # noqa: E402
from aepo_lite.core.aepo import EnergyLearner  # noqa: E402
from aepo_lite.core.critics import make_critic  # noqa: E402
from aepo_lite.core.diffusion import DiffusionModel, energy_guidance  # noqa: E402
from aepo_lite.core.nets import EnergyNet, NoiseNet, TwinQ  # noqa: E402
from aepo_lite.core.schedule import VPSchedule  # noqa: E402
from aepo_lite.device import resolve_device  # noqa: E402
from aepo_lite.training import BehaviourLearner  # noqa: E402

STATE_DIM, ACTION_DIM, K = 11, 3, 16


# ----------------------------------------------------------------------------- QGPO, imported from its checkout
def import_qgpo(path: Path):
    """Import QGPO's model code from a checkout (sys.path), stubbing gym/d4rl/sklearn/scipy if absent."""
    root = Path(path) / "Offline_RL_2D"
    if not (root / "diffusion_SDE" / "model.py").is_file():
        raise SystemExit(f"--qgpo {path}: no Offline_RL_2D/diffusion_SDE/model.py there; pass a checkout of "
                         "https://github.com/thu-ml/CEP-energy-guided-diffusion")
    missing = {top for top in ("gym", "d4rl", "sklearn", "scipy") if importlib.util.find_spec(top) is None}
    for name in ("gym", "d4rl", "sklearn", "sklearn.datasets", "sklearn.utils", "scipy", "scipy.special"):
        if name.split(".")[0] in missing and name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo looks modules up by spec
            if name == "sklearn.utils":
                mod.shuffle = None
            if name == "scipy.special":
                mod.softmax = None
            sys.modules[name] = mod
    sys.path.insert(0, str(root))
    from diffusion_SDE import model as qmodel, loss as qloss, schedule as qschedule
    from dataset import dataset as qdataset
    return qmodel, qloss, qschedule, qdataset


def qgpo_commit(path: Path, given: str | None = None) -> str | None:
    """QGPO's own commit: ``given`` (``--qgpo-commit``) when set, else HEAD when ``path`` is the root of its own git
    checkout, else the ``COMMIT`` file that scripts/gpu_prepare.sh writes beside an export, else None. A folder
    inside another repository (``.qgpo/``, exported under ours) is no checkout of its own: ``git -C`` there answers
    with the enclosing repository's HEAD, which is not QGPO's."""
    import subprocess
    if given:
        return given
    path = Path(path).resolve()
    git = ["git", "-C", str(path), "rev-parse"]
    try:
        top = subprocess.run(git + ["--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
        if top and Path(top).resolve() == path:
            return subprocess.run(git + ["HEAD"], capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):  # no git, or not in a repository at all (an archive)
        pass
    stamp = path / "COMMIT"
    return (stamp.read_text().strip() or None) if stamp.is_file() else None


class QGPOSide:
    """QGPO's networks and step functions, called exactly as its train_behavior / train_critic do."""

    def __init__(self, path, device, data):
        qmodel, qloss, qschedule, qdataset = import_qgpo(path)
        self.qmodel, self.qloss, self.qdataset = qmodel, qloss, qdataset
        dev = str(device)
        self.args = types.SimpleNamespace(device=dev, alpha=3.0, q_alpha=1.0, method="CEP")
        self.mps = functools.partial(qschedule.marginal_prob_std, device=dev)
        # the one device fix: update_qt calls schedule.marginal_prob_std(t) whose default device is
        # "cuda"; point the module attribute at the same function with our device (nothing else changes)
        qschedule.marginal_prob_std = self.mps
        self.args.marginal_prob_std_fn = self.mps
        self.score = qmodel.ScoreNet(input_dim=STATE_DIM + ACTION_DIM, output_dim=ACTION_DIM,
                                     marginal_prob_std=self.mps, args=self.args).to(dev)
        self.critic = self.score.q[0]
        self.critic.guidance_scale = 1.0
        self.data, self.device = data, device

    def params(self):
        n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
        score = sum(p.numel() for name, p in self.score.named_parameters() if not name.startswith("q") and p.requires_grad)
        return {"behaviour": score, "critic": n(self.critic.q0), "energy": n(self.critic.qt)}

    def behaviour_step(self, batch):
        opt = torch.optim.Adam(self.score.parameters(), lr=1e-4)  # train_behavior's optimiser

        def step():
            data = self.data.batch(batch)
            s, a = data["s"], data["a"]
            self.score.condition = s
            loss = self.qloss.loss_fn(self.score, a, self.args.marginal_prob_std_fn)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.score.condition = None
        return step

    def behaviour_step_dataloader(self, batch):
        """train_behavior as it runs: its D4RL_dataset (built without d4rl) through a torch DataLoader."""
        ds = object.__new__(self.qdataset.D4RL_dataset)
        d = self.data.tensors
        ds.states, ds.actions, ds.next_states = d["s"].cpu(), d["a"].cpu(), d["s_"].cpu()
        ds.rewards, ds.is_finished, ds.len = d["r"][:, None].cpu(), d["done"][:, None].cpu(), d["s"].shape[0]
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True)

        def forever():
            while True:
                yield from loader
        datas = forever()
        opt = torch.optim.Adam(self.score.parameters(), lr=1e-4)

        def step():
            data = next(datas)
            data = {k: v.to(self.args.device) for k, v in data.items()}
            self.score.condition = data["s"]
            loss = self.qloss.loss_fn(self.score, data["a"], self.args.marginal_prob_std_fn)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.score.condition = None
        return step

    def _critic_batch(self, batch):
        b = self.data.batch(batch)
        return {"s": b["s"], "a": b["a"], "r": b["r"][:, None], "s_": b["s_"], "d": b["done"][:, None],
                "fake_a": b["support"], "fake_a_": b["support_next"]}

    def critic_step(self, batch):
        return lambda: self.critic.update_q0(self._critic_batch(batch))

    def energy_step(self, batch):
        return lambda: self.critic.update_qt(self._critic_batch(batch))

    def sampler(self, batch):
        states = self.data.tensors["s"][:batch].cpu().numpy()
        return lambda: self.score.select_actions(states, diffusion_steps=15)


# ----------------------------------------------------------------------------- aepo_lite at matched sizes
class ResidentData:
    """A random data set of Hopper shape on the device; batches by on-device indexing (both sides)."""

    def __init__(self, n, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tensors = {"s": torch.randn(n, STATE_DIM, generator=g), "a": torch.rand(n, ACTION_DIM, generator=g) * 2 - 1,
                        "r": torch.randn(n, generator=g), "s_": torch.randn(n, STATE_DIM, generator=g),
                        "done": (torch.rand(n, generator=g) < 0.01).float(),
                        "support": torch.rand(n, K, ACTION_DIM, generator=g) * 2 - 1,
                        "support_next": torch.rand(n, K, ACTION_DIM, generator=g) * 2 - 1}
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        self.n, self.device = n, device

    def batch(self, size):
        idx = torch.randint(0, self.n, (size,), device=self.device)
        return {k: v[idx] for k, v in self.tensors.items()}


class AepoSide:
    """aepo_lite's stages at QGPO's sizes, built from the library's networks and learners. ``activation``:
    the noise and energy networks' (None: each network's default); ``critic_activation``: the critic's
    (QGPO's is ReLU; the library's default critics are smooth, which AEPO's first/second-order expansions need)."""

    def __init__(self, device, data, noise_hidden, noise_blocks, activation, critic_activation=None):
        torch.manual_seed(0)
        act = {} if activation is None else {"activation": activation}
        self.behaviour = DiffusionModel(NoiseNet(ACTION_DIM, STATE_DIM, noise_hidden, noise_blocks, **act),
                                        VPSchedule()).to(device)
        self.energy = {m: EnergyNet(ACTION_DIM, STATE_DIM, 256, 4, **act).to(device) for m in ("qgpo", "aepo")}
        self.critic_activation = critic_activation or activation or "mish"
        self.critic_target = TwinQ(STATE_DIM, ACTION_DIM, 256, 3, self.critic_activation).to(device).requires_grad_(False)
        self.data, self.device = data, device

    def params(self):
        n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
        return {"behaviour": n(self.behaviour), "critic": sum(p.numel() for p in self.critic_target.parameters()),
                "energy": n(self.energy["qgpo"])}

    def behaviour_step(self, batch):
        """``BehaviourLearner.step`` (denoising score matching, Adam lr 1e-4, QGPO's)."""
        learner = BehaviourLearner(self.behaviour, 1e-4)

        def step():
            b = self.data.batch(batch)
            learner.step({"a": b["a"], "s": b["s"]})
        return step

    def critic_step(self, batch):
        """``InSupportCritic.step`` (the metrics stay on the device, as in a training loop)."""
        critic = make_critic(STATE_DIM, ACTION_DIM, CriticConfig(kind="insupport", hidden=256, depth=3,
                                                                 activation=self.critic_activation)).to(self.device)

        def step():
            b = self.data.batch(batch)
            critic.step({"s": b["s"], "a": b["a"], "r": b["r"], "s2": b["s_"], "done": b["done"],
                         "support2": b["support_next"]})
        return step

    def energy_step(self, batch, method="qgpo"):
        """``EnergyLearner.step``; as QGPO's update_qt does, the support Q comes from the target critic in the step."""
        q_target = self.critic_target.q_min
        learner = EnergyLearner(self.energy[method], EnergyConfig(beta=3.0), schedule=self.behaviour.schedule,
                                eps_fn=self.behaviour.eps, q_fn=q_target, method=method)

        def step():
            b = self.data.batch(batch)
            if method == "qgpo" or (method == "aepo" and learner.cfg.posterior != "gaussian"):  # the default: particles
                with torch.no_grad():
                    b["support_q"] = q_target(b["s"].repeat_interleave(K, dim=0),
                                              b["support"].reshape(batch * K, ACTION_DIM)).reshape(batch, K)
            learner.step(b)
        return step

    def sampler(self, batch):
        states = self.data.tensors["s"][:batch].cpu().numpy()
        guide = energy_guidance(self.energy["qgpo"])

        def call():
            s = torch.as_tensor(states, dtype=torch.float32, device=self.device)
            a = self.behaviour.sample(cond=s, n_steps=15, solver="dpmpp2m", guidance=guide, guidance_scale=1.0)
            return a.cpu().numpy()
        return call


# ----------------------------------------------------------------------------- timing
def _block(fn, n, device):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def interleave(pairs, *, rounds, min_time, device, log=print):
    """pairs: [(name, qgpo_fn, aepo_fn)]. Returns {name: {"qgpo": [s/call per round], "aepo": [...]}}."""
    calls, out = {}, {}
    for name, fq, fa in pairs:  # warm both up, then size the blocks by the slower one
        for f in (fq, fa):
            f()
        one = max(_block(fq, 1, device), _block(fa, 1, device))
        calls[name] = max(1, int(min_time / max(one, 1e-9)))
        out[name] = {"qgpo": [], "aepo": []}
    for r in range(rounds):
        for name, fq, fa in pairs:
            order = [("qgpo", fq), ("aepo", fa)] if r % 2 == 0 else [("aepo", fa), ("qgpo", fq)]
            for side, f in order:
                out[name][side].append(_block(f, calls[name], device))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(v['qgpo']) / statistics.median(v['aepo']):.2f}"
                                                     for n, v in out.items()))
    return out, calls


def summarise(raw, calls, pairs_meta):
    rows = []
    for name, v in raw.items():
        q, a = statistics.median(v["qgpo"]), statistics.median(v["aepo"])
        per_round = statistics.median([x / y for x, y in zip(v["qgpo"], v["aepo"])])
        rows.append({"stage": name, **pairs_meta[name], "qgpo_s": q, "aepo_s": a, "ratio": q / a,
                     "ratio_median_of_rounds": per_round, "calls_per_block": calls[name],
                     "qgpo_rounds_s": v["qgpo"], "aepo_rounds_s": v["aepo"]})
    return rows


def _fmt_s(x):
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.2f} s"


def to_markdown(result):
    lines = ["| stage | batch | QGPO (its code) | aepo_lite | QGPO / aepo_lite | per-round median | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['stage']} | {r['batch']} | {_fmt_s(r['qgpo_s'])} | {_fmt_s(r['aepo_s'])} | "
                     f"{r['ratio']:.2f}x | {r['ratio_median_of_rounds']:.2f}x | {r['note']} |")
    p = result["params"]
    lines += ["", "| network | QGPO params | aepo_lite params |", "|---|---:|---:|"]
    for k in ("behaviour", "critic", "energy"):
        lines.append(f"| {k} | {p['qgpo'][k]:,} | {p['aepo_matched'][k]:,} |")
    lines.append(f"| behaviour (aepo_lite default NoiseNet) | | {p['aepo_default']['behaviour']:,} |")
    e = result["environment"]
    lines += ["", f"Machine: {e['device']} ({e.get('gpu') or e['cpu']}; {e['cpu_count']} CPUs, {e['torch_threads']} torch "
                  f"threads, load average {e['load_average_1min']} at the end). torch {e['torch']}, python {e['python']}. "
                  f"QGPO commit {result['qgpo_commit'] or 'unknown'}. {result['rounds']} interleaved rounds; "
                  "times are medians of seconds per call."]
    return "\n".join(lines) + "\n"


def _rows(quick: bool, dataloader: bool) -> list[tuple]:
    """(stage, batch, note, QGPO's call from its side, aepo_lite's call from its sides) for each row."""
    rows = [("behaviour", 4096, "matched parameter count, SiLU",
             lambda q: q.behaviour_step(4096), lambda a: a["matched"].behaviour_step(4096)),
            ("behaviour (aepo_lite default net)", 4096, "aepo_lite's default NoiseNet (smaller, Mish)",
             lambda q: q.behaviour_step(4096), lambda a: a["default"].behaviour_step(4096)),
            ("critic (in-support softmax)", 256, f"K = {K} next support actions; QGPO's ReLU TwinQ on both sides",
             lambda q: q.critic_step(256), lambda a: a["matched"].critic_step(256)),
            ("critic, aepo_lite smooth (SiLU)", 256, "a smooth critic (AEPO's first/second order need one): "
             "SiLU costs ~3x ReLU per element here", lambda q: q.critic_step(256), lambda a: a["smooth"].critic_step(256)),
            ("energy (CEP)", 256, f"K = {K} support actions, target-critic Q inside the step",
             lambda q: q.energy_step(256), lambda a: a["matched"].energy_step(256, "qgpo")),
            ("energy: aepo_lite AEPO vs QGPO CEP", 256, "different algorithms: AEPO needs no support actions",
             lambda q: q.energy_step(256), lambda a: a["matched"].energy_step(256, "aepo"))]
    for b in (1, 256) if quick else (1, 256, 4096):
        rows.append((f"guided sampling b{b}", b, "15 steps, numpy in/out, per call",
                     lambda q, b=b: q.sampler(b), lambda a, b=b: a["matched"].sampler(b)))
    if dataloader:
        rows.append(("behaviour, QGPO's DataLoader", 4096, "QGPO as its train_behavior runs (per-item Dataset + "
                     "DataLoader collate); aepo_lite with resident data",
                     lambda q: q.behaviour_step_dataloader(4096), lambda a: a["matched"].behaviour_step(4096)))
    return rows


def aepo_sides(device, data) -> dict:
    """aepo_lite at QGPO's parameter counts and activations (SiLU; its ReLU critic), with a SiLU critic, and the
    library's default networks (Mish)."""
    return {"matched": AepoSide(device, data, noise_hidden=448, noise_blocks=2, activation="silu",
                                critic_activation="relu"),
            "default": AepoSide(device, data, noise_hidden=256, noise_blocks=3, activation=None),
            "smooth": AepoSide(device, data, noise_hidden=448, noise_blocks=2, activation="silu")}


def dry_run(rows, sides, device) -> int:
    """Build and call every aepo_lite row twice, without QGPO: checks this side runs. The seconds of one
    call per row are printed as a smoke check, not a measurement."""
    print(f"compare_qgpo --dry-run: aepo_lite side only, device {device}, {torch.get_num_threads()} threads")
    for name, batch, _, _, make_aepo in rows:
        fn = make_aepo(sides)
        fn()
        print(f"  {name:<36} batch {batch:>5}  {_fmt_s(_block(fn, 1, device))} per call")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qgpo", default=None, help="path of a checkout of thu-ml/CEP-energy-guided-diffusion")
    ap.add_argument("--qgpo-commit", default=None, help="its commit, recorded in the output (default: HEAD of --qgpo "
                                                         "when it is its own git checkout, else its COMMIT file)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (QGPO's code gets the same device)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians over rounds)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds one timed block should last")
    ap.add_argument("--quick", action="store_true", help="3 rounds, short blocks, no batch-4096 sampling")
    ap.add_argument("--no-dataloader", action="store_true", help="skip the row with QGPO's DataLoader")
    ap.add_argument("--dry-run", action="store_true", help="no QGPO: build and call each aepo_lite row twice (checks "
                                                           "this side runs; compares nothing)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return ap


def main(argv=None):
    ap = _parser()
    args = ap.parse_args(argv)
    if args.qgpo is None and not args.dry_run:
        ap.error("--qgpo: give a checkout of thu-ml/CEP-energy-guided-diffusion (or --dry-run for aepo_lite's side only)")
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.min_time = 3, 0.3
    device = resolve_device(args.device)
    torch.manual_seed(0)
    data = ResidentData(100_000, device)
    sides = aepo_sides(device, data)
    rows = _rows(args.quick, not args.no_dataloader and not args.dry_run)
    if args.dry_run:
        return dry_run(rows, sides, device)
    qgpo = QGPOSide(args.qgpo, device, data)
    pairs = [(name, make_q(qgpo), make_a(sides)) for name, _, _, make_q, make_a in rows]
    meta = {name: {"batch": batch, "note": note} for name, batch, note, _, _ in rows}
    print(f"compare_qgpo: device {device}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    raw, calls = interleave(pairs, rounds=args.rounds, min_time=args.min_time, device=device)
    result = {"environment": bench.environment(device), "qgpo_commit": qgpo_commit(Path(args.qgpo), args.qgpo_commit),
              "rounds": args.rounds, "min_time": args.min_time, "threads": torch.get_num_threads(),
              "shapes": {"state_dim": STATE_DIM, "action_dim": ACTION_DIM, "support_k": K},
              "params": {"qgpo": qgpo.params(), "aepo_matched": sides["matched"].params(),
                         "aepo_default": sides["default"].params()},
              "aepo_lite_sizes": {"matched": {"noise_hidden": 448, "noise_blocks": 2, "energy": "EnergyNet(256, depth 4)",
                                              "critic": "TwinQ(256, depth 3), ReLU (QGPO's)", "activation": "silu"},
                                  "default": {"noise_hidden": 256, "noise_blocks": 3, "activation": "mish"}},
              "rows": summarise(raw, calls, meta)}
    _write(result, args.out)
    return 0


def _write(result: dict, out: str | None) -> None:
    md = to_markdown(result)
    print()
    print(md)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
