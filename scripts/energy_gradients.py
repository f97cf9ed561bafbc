"""Tabulate mean ||grad_a f_phi(s, a_t, t)|| of trained runs by t (aepo_lite.rl.diagnostics).

    python scripts/energy_gradients.py --runs RUN [RUN ...] --out figures/rl_6c/energy_gradients.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aepo_lite._io import atomic_write_text
from aepo_lite.rl.diagnostics import gradient_table

HEADER = ("# Guidance size by diffusion time\n\nMean ||grad_a f_phi(s, a_t, t)|| over 512 dataset transitions, "
          "a_t = alpha_t a + sigma_t eps (made by `scripts/energy_gradients.py`; docs/derivation.md section 4b).\n\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with an energy network")
    p.add_argument("--out", default=None, help="write the table here (Markdown); default: print it")
    a = p.parse_args(argv)
    text = HEADER + gradient_table(a.runs)
    if a.out:
        atomic_write_text(Path(a.out), text)
        print(f"wrote {a.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
