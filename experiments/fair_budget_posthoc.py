"""Post-hoc diagnostic of the seed-0 stage-1 budget runs (issue 17; experiments/README.md): the N-step
coupled error against the exact ODE and the distance to data of saved stage-1 models. Run *after* the budget
and the hyper-parameters were fixed (experiments/results_fair/budget/RULE.md): nothing here chose anything.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fair_budget_posthoc.py --cache /tmp/s9run/cache \
        --model g1:2000:experiments/results_fair/select_stage1/models/seed0_g1_cosine@0.001.pt ... \
        --out experiments/results_fair/budget/posthoc.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_anystep as fa
import toy_anystep as toy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="ARM:STEPS:PATH (ARM g1, released or meanflow)")
    p.add_argument("--cache", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    fa.PATHS["cache"] = a.cache or None
    fc = fa.FairConfig()
    s = fa.Setup(a.seed, fc)
    refs = {g: fa.exact_reference(s.z, s.labels, g, fc.ref_steps) for g in (1.0, 3.0)}
    rows = []
    for spec in a.model:
        arm, steps, path = spec.split(":", 2)
        g = 1.0 if arm == "g1" else 3.0
        m = toy.make_student(s.teacher, s.data, torch.Generator().manual_seed(0))
        m.load_state_dict(torch.load(path))
        samp = s.fm_sampler(m.requires_grad_(False))
        xs = {n: samp(n) for n in fc.nfe}
        rows.append(
            {
                "arm": arm,
                "steps": int(steps),
                "path": path,
                "coupled": {str(n): fa.coupled(x, refs[g]) for n, x in xs.items()},
                "dist": {str(n): s.dist(x) for n, x in xs.items()},
            }
        )
        print(arm, steps, {k: round(v, 4) for k, v in rows[-1]["coupled"].items()})
    Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
