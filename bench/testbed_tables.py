"""The testbed tables of docs/RESULTS.md from one `bench/testbeds.sh` run folder.

    .venv/bin/python bench/testbed_tables.py RUN_FOLDER [--ours LABEL] [--models NAME,NAME]

For every model sub-folder (results.csv) and budget: one row per method (ppl ratio, KL, top-1, and per domain
"ppl ratio / KL"), the methods that are ours (labels starting with ``refit``) with the number of the 12
per-domain cells in which they are strictly lower than every other method, and the best other method per domain.
``--ours`` prints that label in bold.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from moe_compress.report.bench import domains_of  # noqa: E402

OURS_PREFIX = "refit"


def cells_won(row: dict, refs: list[dict], domains: list[str]) -> int:
    """How many of the per-domain ppl ratios and KLs of ``row`` are strictly below those of every row in refs."""
    return sum(float(row[f"{d}.{m}"]) < min(float(r[f"{d}.{m}"]) for r in refs)
               for d in domains for m in ("ppl_ratio", "kld"))


def table(rows: list[dict], domains: list[str], bold: str | None) -> list[str]:
    refs = [r for r in rows if not r["method"].startswith(OURS_PREFIX)]
    out = ["| method | ppl ratio | KL | top-1 | " + " | ".join(domains) + " | domain cells won |",
           "|---|---:|---:|---:|" + "---|" * len(domains) + "---:|"]
    for r in rows:
        name = f"**{r['method']}**" if r["method"] == bold else r["method"]
        won = f"{cells_won(r, refs, domains)}/{2 * len(domains)}" if r["method"].startswith(OURS_PREFIX) else ""
        cells = " | ".join(f"{float(r[d + '.ppl_ratio']):.3f} / {float(r[d + '.kld']):.3f}" for d in domains)
        out.append(f"| {name} | {float(r['ppl_ratio']):.3f} | {float(r['kld']):.4f} | {float(r['top1']):.4f} | "
                   f"{cells} | {won} |")
    best = []
    for d in domains:
        p = min(refs, key=lambda r: float(r[f"{d}.ppl_ratio"]))
        k = min(refs, key=lambda r: float(r[f"{d}.kld"]))
        best.append(f"{d} {float(p[d + '.ppl_ratio']):.3f} ({p['method']}) / {float(k[d + '.kld']):.3f} "
                    f"({k['method']})")
    out += ["", "Best reference per domain (ppl ratio / KL): " + "; ".join(best) + "."]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--ours", default=None, help="the label printed in bold")
    ap.add_argument("--models", default=None, help="model sub-folders in this order (default: all, sorted)")
    a = ap.parse_args()
    paths = ([a.run / m / "results.csv" for m in a.models.split(",")] if a.models
             else sorted(a.run.glob("*/results.csv")))
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise SystemExit(f"error: no results.csv in {', '.join(missing) or str(a.run) + '/*/'}")
    for csv_path in paths:
        rows = list(csv.DictReader(csv_path.open()))
        domains = domains_of(rows)
        print(f"### {csv_path.parent.name}\n")
        for n in sorted({int(r["experts"]) for r in rows}, reverse=True):
            sel = [r for r in rows if int(r["experts"]) == n]
            print(f"**{n} experts kept** (params {float(sel[0]['params_M']):.2f}M)\n")
            print("\n".join(table(sel, domains, a.ours)) + "\n")


if __name__ == "__main__":
    main()
