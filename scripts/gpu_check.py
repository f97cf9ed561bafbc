"""The python part of scripts/gpu_check.sh: gathers what its steps wrote into one bench result and writes it as
``OUT.json`` and ``OUT.md`` (``aepo_lite.bench.to_markdown``, so ``aepo-lite figures`` rebuilds the same table
from the JSON).

    python scripts/gpu_check.py --work DIR --out figures/bench_cuda

DIR holds ``eager.json`` (an ``aepo-lite bench`` result: the base of the file), optionally ``compiled.json`` and
``captured.json`` (the same stages compiled / captured: their rates go under ``variants``, and the stages a
captured run had to run eagerly, with why, under ``variant_errors``), ``paths.json``
(scripts/gpu_paths.py: under ``paths``), ``seeds.json`` (scripts/seeds_timing.py: under ``seeds``), ``tf32.json``
(scripts/tf32_check.py: under ``tf32``), and ``status.tsv`` (one line per step: name, exit status (-1: skipped,
its limit did not fit the time budget), seconds; its log ``<name>.log`` gives the last line shown). The device is named as torch names it
(``torch.cuda.get_device_name``, under ``environment.device_name``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return (lines[-1] if lines else "").replace("|", "/")[:160]


def combine(work: Path) -> dict:
    """One result from the step outputs in ``work`` (see the module docstring)."""
    import torch
    result = _read(work / "eager.json")
    if result is None:
        raise SystemExit(f"gpu_check: {work / 'eager.json'} is missing or unreadable: the eager bench failed "
                         f"(see {work / 'eager.log'})")
    env = result["environment"]
    env["device_name"] = (torch.cuda.get_device_name(env["device"]) if env["device"].startswith("cuda")
                          else env.get("cpu"))
    variants, errors = {}, {}
    for name in ("compiled", "captured"):
        other = _read(work / f"{name}.json")
        if other is not None:
            variants[name] = {k: s["rate"] for k, s in other["stages"].items()}
            errors[name] = {k: s["capture_error"] for k, s in other["stages"].items() if "capture_error" in s}
    result["variants"], result["variant_errors"] = variants, errors
    result["paths"] = _read(work / "paths.json")
    result["seeds"] = _read(work / "seeds.json")
    result["tf32"] = _read(work / "tf32.json")
    checks = {}
    status = work / "status.tsv"
    for line in status.read_text().splitlines() if status.exists() else []:
        name, rc, secs = line.split("\t")
        checks[name] = {"rc": int(rc), "seconds": float(secs), "summary": _last_line(work / f"{name}.log")}
    result["checks"] = checks
    return result


def main(argv=None) -> int:
    from aepo_lite import bench
    from aepo_lite._io import atomic_write_text
    ap = argparse.ArgumentParser(description="gather scripts/gpu_check.sh's outputs into OUT.json and OUT.md")
    ap.add_argument("--work", required=True, help="the folder the check's steps wrote to")
    ap.add_argument("--out", required=True, help="output path without suffix, e.g. figures/bench_cuda")
    a = ap.parse_args(argv)
    result = combine(Path(a.work))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    atomic_write_text(out.with_suffix(".json"), text)
    atomic_write_text(out.with_suffix(".md"), bench.to_markdown(json.loads(text)))  # as `aepo-lite figures` does
    print(f"gpu_check: wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} "
          f"({result['environment']['device_name']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
