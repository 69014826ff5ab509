"""Write the shipped logs into datasets/<name>/ and datasets/README.md (deterministic by seed).

    .venv/bin/python scripts/make_datasets.py [--out datasets] [NAME ...]

Every log is defined in `offpg_offline.data.synthetic.SYNTHETIC` (behavior policy, env, size,
seed); rerunning gives byte-identical Parquet files and cards. The README table is built from
the cards, so it always quotes the measured returns.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from offpg_offline.data.schema import SCHEMA_VERSION
from offpg_offline.data.store import card_path, is_dataset, read_card
from offpg_offline.data.synthetic import SYNTHETIC, make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def readme(out: Path) -> str:
    """datasets/README.md: one row per shipped log, from its card."""
    lines = [
        "# Shipped datasets",
        "",
        f"Canonical format, schema version {SCHEMA_VERSION} (DESIGN.md §2): each folder holds "
        "`part-*.parquet` and its `_dataset.json` card (the leading `_` hides it from Parquet "
        "engines, so each folder also opens as a plain Parquet dataset: "
        "`pyarrow.dataset.dataset(\"datasets/cartpole-eps\", format=\"parquet\")`, "
        "`polars.scan_parquet(\"datasets/cartpole-eps/*.parquet\")`).",
        "Made by `scripts/make_datasets.py` from `offpg_offline/data/synthetic.py` (fixed seeds; "
        "rerunning reproduces the files byte for byte). Returns are undiscounted; *behavior* is "
        "the mean over the logged episodes, *greedy* the mean over 100 fresh episodes of the "
        "behavior's most likely (discrete) or mean (continuous) action.",
        "",
        "| name | env | episodes | steps | behavior return | greedy return | logged_logp | size |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name in SYNTHETIC:
        card = read_card(out / name)
        behavior = card["behavior"]
        size = sum(f["bytes"] for f in card["files"]) + card_path(out / name).stat().st_size
        logged = "exact" if card["propensity"]["logged_logp"] else "null"
        lines.append(
            f"| `{name}` | {card['env_spec']['id']} | {card['counts']['episodes']} | "
            f"{card['counts']['steps']} | {behavior['mean_return']:.1f} ± "
            f"{behavior['std_return']:.1f} | {behavior['greedy_mean_return']:.1f} | {logged} | "
            f"{size / 1e6:.2f} MB |")
    lines += ["", "Behavior policies (details and parameters in each card's `behavior`):", ""]
    for name, spec in SYNTHETIC.items():
        lines.append(f"- `{name}`: {spec.description}")
    lines += [
        "",
        "`pendulum-gauss`: actions are drawn from a Gaussian truncated to the action bounds "
        "[-2, 2] (rejection sampling), never clipped after sampling, so `logged_logp` is the "
        "exact density N(a; μ, σ²) / (Φ((2 − μ)/σ) − Φ((−2 − μ)/σ)).",
        "",
        "`cartpole-eps-noprop` is the `cartpole-eps` log with `logged_logp` null; its true "
        "log-probabilities are in `cartpole-eps`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "datasets")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"logs to write (default: all of {', '.join(SYNTHETIC)})")
    args = parser.parse_args()
    if unknown := sorted(set(args.names) - set(SYNTHETIC)):
        parser.error(f"unknown log(s): {', '.join(unknown)}")
    for name in args.names or SYNTHETIC:
        start = time.perf_counter()
        path = make_synthetic(name, args.out / name, overwrite=True, progress=print)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"  -> {path} ({size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s)")
    if all(is_dataset(args.out / name) for name in SYNTHETIC):
        (args.out / "README.md").write_text(readme(args.out))
        print(f"  -> {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
