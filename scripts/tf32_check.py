"""TF32 against full float32 on toy tasks, where the exact target is known: the same runs (same seed, same
steps) trained and sampled once with TF32 matmuls off and once on, and their energy error against the exact
E_t and sampler distance to exact target samples set side by side, with the wall time.

    python scripts/tf32_check.py --device cuda --out /tmp/tf32.json     # a GPU session (scripts/gpu_check.sh)
    python scripts/tf32_check.py --device cpu --tiny                     # checks it runs (tests)

TF32 (``torch.backends.cuda.matmul.allow_tf32``) rounds matmul inputs to 10 mantissa bits on Ampere and later
GPUs; on a CPU the flag changes nothing, so both rows are the same computation there. Each precision trains
into its own stage cache (the stage hashes do not see the flag). The library leaves TF32 off; this script is
the measurement that would turn it on (or not) where the toy error budget shows no loss.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aepo_lite._io import atomic_write_json  # noqa: E402

SPECS = ("qgpo", "aepo:particles-K64-centered")


@contextlib.contextmanager
def tf32(on: bool):
    """TF32 matmuls (and cuDNN) on or off inside the block; the previous flags restored after it."""
    import torch
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _config(task: str, spec: str, device: str, energy_steps: int, tiny: bool):
    from aepo_lite.toy.pipeline import estimator_overrides, make_config
    method, _, est = spec.partition(":")
    over = estimator_overrides(est) if est else {}
    energy = dict(over.get("energy", {}), steps=energy_steps)
    if tiny:
        return make_config(task, method, "smoke", seed=0, device=device, energy=energy, support=over.get("support"),
                           critic={"kind": "reward"})
    return make_config(task, method, "full", seed=0, device=device, energy=energy, support=over.get("support"),
                       critic={"kind": "reward"})


def run(device: str = "cpu", tasks=("8gaussians", "moons"), specs=SPECS, energy_steps: int = 2000,
        tiny: bool = False, log=print) -> dict:
    import torch
    from aepo_lite.device import resolve_device
    from aepo_lite.toy.pipeline import estimator_label, run_toy
    dev = resolve_device(device)
    out = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "torch": torch.__version__, "energy_steps": energy_steps, "tiny": tiny, "rows": [],
           "note": None if dev.type == "cuda" else "TF32 does not exist on the CPU: both rows compute the same"}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "tf32"):
            for task in tasks:
                for spec in specs:
                    cfg = _config(task, spec, str(dev), energy_steps, tiny)
                    t0 = time.perf_counter()
                    with tf32(precision == "tf32"):
                        res = run_toy(cfg, Path(tmp) / precision / task / spec.replace(":", "-"),
                                      cache_dir=Path(tmp) / precision / "cache", progress=False, figure=False,
                                      budget=False)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    errs = res["energy_error"]
                    r = res["results"][0]
                    row = {"task": task, "method": estimator_label(cfg) or cfg.method, "precision": precision,
                           "err_mean": sum(errs.values()) / len(errs), "distance": r["distance"],
                           "floor": r["floor"], "seconds": time.perf_counter() - t0}
                    out["rows"].append(row)
                    log(f"  {precision} {task} {row['method']}: energy error {row['err_mean']:.4f}, distance "
                        f"{row['distance']:.4f} (floor {row['floor']:.4f}), {row['seconds']:.1f} s")
    out["pairs"] = pairs(out["rows"])
    return out


def pairs(rows: list[dict]) -> list[dict]:
    """Each (task, method): TF32 over float32 for the energy error, the distance and the time."""
    by = {(r["task"], r["method"], r["precision"]): r for r in rows}
    out = []
    for (task, method, prec), r in by.items():
        other = by.get((task, method, "tf32"))
        if prec != "fp32" or other is None:
            continue
        out.append({"task": task, "method": method, "err_ratio": other["err_mean"] / r["err_mean"],
                    "distance_ratio": other["distance"] / r["distance"], "time_ratio": other["seconds"] / r["seconds"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--tasks", nargs="+", default=["8gaussians", "moons"])
    ap.add_argument("--energy-steps", type=int, default=2000)
    ap.add_argument("--tiny", action="store_true", help="the smoke preset: checks it runs, measures nothing")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = run(a.device, tuple(a.tasks), SPECS, a.energy_steps, a.tiny)
    res["seconds"] = time.perf_counter() - t0
    for p in res["pairs"]:
        print(f"  {p['task']} {p['method']}: tf32 / fp32 energy error {p['err_ratio']:.3f}, distance "
              f"{p['distance_ratio']:.3f}, time {p['time_ratio']:.2f}")
    if a.out:
        print(f"wrote {atomic_write_json(a.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
