"""Side by side: QGPO's official code (thu-ml/CEP-energy-guided-diffusion) against aepo_lite, per-step
times of behaviour training, critic and energy training and guided sampling, at the same network
and batch sizes, in one process on one machine, interleaved.

    python scripts/compare_qgpo.py --qgpo /path/to/CEP-energy-guided-diffusion [--device cpu] [--threads 1]
                                   [--rounds 7] [--quick] [--out figures/compare_qgpo_cpu]

It fetches nothing: ``--qgpo`` is a checkout you made (``git clone``), used unmodified. Only its
model files are imported (``Offline_RL_2D/diffusion_SDE``, and ``dataset/dataset.py`` for the row that
times its DataLoader); the modules those files import at the top but never use here (gym, d4rl,
sklearn) are stubbed with empty ``sys.modules`` entries when they are not installed. Its device
comes from its own ``args.device``, which this script sets, and one run-time patch: its
``schedule.marginal_prob_std`` defaults to ``device="cuda"`` (called so in ``update_qt``), so the module
attribute is replaced by the same function bound to the chosen device. No file of it is changed or copied.

What is timed (Hopper shapes: state 11, action 3; K = 16 support actions):
  behaviour   QGPO: its ``train_behavior`` loop body (``loss_fn`` on ScoreNet, Adam lr 1e-4), batch 4096;
              aepo_lite: ``DiffusionModel.loss`` on a NoiseNet with QGPO's parameter count (and the
              library default, smaller), Adam lr 1e-4.
  critic      QGPO: ``QGPO_Critic.update_q0`` (in-support softmax target over K next actions), batch 256;
              aepo_lite: ``critics.InSupportCritic.step`` (the same target), TwinQ 3 x 256 with QGPO's
              ReLU, and a second row with aepo_lite's smooth critic (SiLU) against the same QGPO step.
  energy      QGPO: ``QGPO_Critic.update_qt`` with method CEP, batch 256 x K;
              aepo_lite: ``EnergyLearner`` (cep) with support Q from the target critic, EnergyNet 4 x 256.
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
import os
import platform
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aepo_lite import bench  # noqa: E402
from aepo_lite.config import EnergyConfig  # noqa: E402
from aepo_lite.core.aepo import EnergyLearner  # noqa: E402
from aepo_lite.config import CriticConfig  # noqa: E402
from aepo_lite.core.critics import make_critic  # noqa: E402
from aepo_lite.device import resolve_device  # noqa: E402
from aepo_lite.core.diffusion import DiffusionModel, energy_guidance  # noqa: E402
from aepo_lite.core.nets import NoiseNet, TwinQ  # noqa: E402
from aepo_lite.core.schedule import VPSchedule  # noqa: E402

STATE_DIM, ACTION_DIM, K = 11, 3, 16


# ----------------------------------------------------------------------------- QGPO, imported from its checkout
def import_qgpo(path: Path):
    """Import QGPO's model code from a checkout (sys.path), stubbing gym/d4rl/sklearn if absent."""
    root = Path(path) / "Offline_RL_2D"
    if not (root / "diffusion_SDE" / "model.py").is_file():
        raise SystemExit(f"--qgpo {path}: no Offline_RL_2D/diffusion_SDE/model.py there; pass a checkout of "
                         "https://github.com/thu-ml/CEP-energy-guided-diffusion")
    missing = {top for top in ("gym", "d4rl", "sklearn") if importlib.util.find_spec(top) is None}
    for name in ("gym", "d4rl", "sklearn", "sklearn.datasets", "sklearn.utils"):
        if name.split(".")[0] in missing and name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo looks modules up by spec
            if name == "sklearn.utils":
                mod.shuffle = None
            sys.modules[name] = mod
    sys.path.insert(0, str(root))
    from diffusion_SDE import model as qmodel, loss as qloss, schedule as qschedule
    from dataset import dataset as qdataset
    return qmodel, qloss, qschedule, qdataset


def qgpo_commit(path: Path) -> str | None:
    head = Path(path) / ".git"
    try:
        import subprocess
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except Exception:  # not a git checkout (an archive): fine
        return None if not head.exists() else "unknown"


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
    """aepo_lite's stages at QGPO's sizes. ``critic_activation``: the critic's (QGPO's is ReLU; the
    library's default critics are smooth, which AEPO's first/second-order expansions need)."""

    def __init__(self, device, data, noise_hidden, noise_blocks, activation, critic_activation=None):
        cfg = bench.BenchConfig(device=str(device), support_k=K, noise_hidden=noise_hidden, noise_blocks=noise_blocks,
                                energy_hidden=256, energy_depth=4, critic_hidden=256, critic_depth=3,
                                methods=("cep", "aepo"), guidance_scale=1.0, activation=activation)
        self.st = bench.Stages(cfg, device)
        self.cfg, self.data, self.device = cfg, data, device
        self.critic_activation = critic_activation or activation or "mish"
        self.critic_target = TwinQ(STATE_DIM, ACTION_DIM, 256, 3, self.critic_activation).to(device).requires_grad_(False)
        # the same resident data as QGPO's side, so both index the same tensors
        t = data.tensors
        self.st.data = {"s": t["s"], "a": t["a"], "r": t["r"], "s_": t["s_"], "done": t["done"]}
        self.st.n = data.n
        self.st.batch = self._batch

    def _batch(self, size):
        b = self.data.batch(size)
        b["fake_a_"] = b.pop("support_next")
        return b

    def params(self):
        n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
        return {"behaviour": n(self.st.behaviour), "critic": n(self.st.critic), "energy": n(self.st.energy["cep"])}

    def behaviour_step(self, batch):
        self.cfg.behaviour_batch = batch
        return self.st.behaviour_step()

    def critic_step(self, batch):
        """``InSupportCritic.step`` (the metrics stay on the device, as in a training loop)."""
        critic = make_critic(STATE_DIM, ACTION_DIM, CriticConfig(kind="insupport", hidden=256, depth=3,
                                                                 activation=self.critic_activation)).to(self.device)

        def step():
            b = self.data.batch(batch)
            critic.step({"s": b["s"], "a": b["a"], "r": b["r"], "s2": b["s_"], "done": b["done"],
                         "support2": b["support_next"]})
        return step

    def energy_step(self, batch, method="cep"):
        """As QGPO's update_qt does, the support Q comes from the target critic inside the step."""
        self.cfg.batch = batch
        ecfg = EnergyConfig(beta=3.0)
        q_target = self.critic_target.q_min
        learner = EnergyLearner(self.st.energy[method], ecfg, schedule=self.st.schedule, eps_fn=self.st.eps,
                                q_fn=q_target, method="qgpo" if method == "cep" else method)
        run = learner.step

        def step():
            b = self._batch(batch)
            if method == "cep":
                with torch.no_grad():
                    b["support_q"] = q_target(b["s"].repeat_interleave(K, dim=0),
                                              b["support"].reshape(batch * K, ACTION_DIM)).reshape(batch, K)
            run(b)
        return step

    def sampler(self, batch):
        states = self.data.tensors["s"][:batch].cpu().numpy()
        guide = energy_guidance(self.st.energy["cep"])
        model: DiffusionModel = self.st.behaviour

        def call():
            s = torch.as_tensor(states, dtype=torch.float32, device=self.device)
            a = model.sample(cond=s, n_steps=15, solver="dpmpp2m", guidance=guide, guidance_scale=1.0)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qgpo", required=True, help="path of a checkout of thu-ml/CEP-energy-guided-diffusion")
    ap.add_argument("--qgpo-commit", default=None, help="its commit, recorded in the output when --qgpo is not a git checkout")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (QGPO's code gets the same device)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians over rounds)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds one timed block should last")
    ap.add_argument("--quick", action="store_true", help="3 rounds, short blocks, no batch-4096 sampling")
    ap.add_argument("--no-dataloader", action="store_true", help="skip the row with QGPO's DataLoader")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.min_time = 3, 0.3
    device = resolve_device(args.device)
    torch.manual_seed(0)
    data = ResidentData(100_000, device)
    qgpo = QGPOSide(args.qgpo, device, data)
    # QGPO's networks: its parameter counts and activations (SiLU; ReLU in its critic)
    matched = AepoSide(device, data, noise_hidden=448, noise_blocks=2, activation="silu", critic_activation="relu")
    default = AepoSide(device, data, noise_hidden=256, noise_blocks=3, activation=None)  # the library default (Mish)
    smooth = AepoSide(device, data, noise_hidden=448, noise_blocks=2, activation="silu")  # SiLU critic

    pairs = [("behaviour", qgpo.behaviour_step(4096), matched.behaviour_step(4096)),
             ("behaviour (aepo_lite default net)", qgpo.behaviour_step(4096), default.behaviour_step(4096)),
             ("critic (in-support softmax)", qgpo.critic_step(256), matched.critic_step(256)),
             ("critic, aepo_lite smooth (SiLU)", qgpo.critic_step(256), smooth.critic_step(256)),
             ("energy (CEP)", qgpo.energy_step(256), matched.energy_step(256, "cep")),
             ("energy: aepo_lite AEPO vs QGPO CEP", qgpo.energy_step(256), matched.energy_step(256, "aepo")),
             ("guided sampling b1", qgpo.sampler(1), matched.sampler(1)),
             ("guided sampling b256", qgpo.sampler(256), matched.sampler(256))]
    meta = {"behaviour": {"batch": 4096, "note": "matched parameter count, SiLU"},
            "behaviour (aepo_lite default net)": {"batch": 4096, "note": "aepo_lite's default NoiseNet (smaller, Mish)"},
            "critic (in-support softmax)": {"batch": 256, "note": f"K = {K} next support actions; QGPO's ReLU TwinQ on both sides"},
            "critic, aepo_lite smooth (SiLU)": {"batch": 256, "note": "a smooth critic (AEPO's first/second order need one): "
                                                 "SiLU costs ~3x ReLU per element here"},
            "energy (CEP)": {"batch": 256, "note": f"K = {K} support actions, target-critic Q inside the step"},
            "energy: aepo_lite AEPO vs QGPO CEP": {"batch": 256, "note": "different algorithms: AEPO needs no support actions"},
            "guided sampling b1": {"batch": 1, "note": "15 steps, numpy in/out, per call"},
            "guided sampling b256": {"batch": 256, "note": "15 steps, numpy in/out, per call"}}
    if not args.quick:
        pairs.append(("guided sampling b4096", qgpo.sampler(4096), matched.sampler(4096)))
        meta["guided sampling b4096"] = {"batch": 4096, "note": "15 steps, numpy in/out, per call"}
    if not args.no_dataloader:
        pairs.append(("behaviour, QGPO's DataLoader", qgpo.behaviour_step_dataloader(4096), matched.behaviour_step(4096)))
        meta["behaviour, QGPO's DataLoader"] = {"batch": 4096, "note": "QGPO as its train_behavior runs (per-item "
                                                 "Dataset + DataLoader collate); aepo_lite with resident data"}
    print(f"compare_qgpo: device {device}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    raw, calls = interleave(pairs, rounds=args.rounds, min_time=args.min_time, device=device)
    rows = summarise(raw, calls, meta)
    result = {"environment": bench.environment(device), "qgpo_commit": qgpo_commit(Path(args.qgpo)) or args.qgpo_commit,
              "rounds": args.rounds, "min_time": args.min_time, "threads": torch.get_num_threads(),
              "shapes": {"state_dim": STATE_DIM, "action_dim": ACTION_DIM, "support_k": K},
              "params": {"qgpo": qgpo.params(), "aepo_matched": matched.params(), "aepo_default": default.params()},
              "aepo_lite_sizes": {"matched": {"noise_hidden": 448, "noise_blocks": 2, "energy": "EnergyNet(256, depth 4)",
                                              "critic": "TwinQ(256, depth 3), ReLU (QGPO's)", "activation": "silu"},
                                  "default": {"noise_hidden": 256, "noise_blocks": 3, "activation": "mish"}},
              "rows": rows}
    md = to_markdown(result)
    print()
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
