"""`offpg ingest` and `offpg info`: command-line values → the data layer's ingest calls.

The CLI's text options (`--map KEY=COLUMN`, `--action-space discrete:N`, `--env-kwargs K=V`,
a mapping TOML file) become the data layer's objects here; `data/minari.py` and
`data/parquet.py` do the conversion. Nothing here prints: progress goes to a callable, our
warnings come back in the result, errors are the data layer's one-sentence ValueErrors
(`DataError`), `FileNotFoundError` or `OSError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Progress = Callable[[int, "int | None"], None]  # (rows just written, total rows if known)


@dataclass(frozen=True)
class Ingested:
    """A written dataset: its folder, its card, our warnings (`per_file`: count output files)."""

    path: Path
    card: dict[str, Any]
    warnings: tuple[str, ...] = ()
    per_file: bool = False  # the summary names the output's file count (Parquet/CSV ingest)

    def summary(self) -> str:
        """`wrote PATH: E episodes, S steps[ in F file(s)]; logged_logp: SOURCE`."""
        counts = self.card["counts"]
        logged = self.card["propensity"]["logged_logp"]
        files = f" in {len(self.card['files'])} file(s)" if self.per_file else ""
        return (f"wrote {self.path}: {counts['episodes']} episodes, {counts['steps']} steps"
                f"{files}; logged_logp: {logged['source'] if logged else 'none (no propensity)'}")


def ingest_minari_dataset(dataset: str, out: Path, *, download: bool = False,
                          propensity_key: str | None = None,
                          propensity_kind: str | None = None, overwrite: bool = False,
                          progress: Progress | None = None) -> Ingested:
    """Convert a Minari dataset (id or folder) with `data.minari.ingest_minari`.

    The warnings kept are ours ("Minari dataset ..."); minari's own are about its metadata.
    """
    from offpg_offline.data.minari import ingest_minari
    from offpg_offline.data.store import read_card

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = ingest_minari(dataset, out, download=download, propensity_key=propensity_key,
                             propensity_kind=propensity_kind, overwrite=overwrite,
                             progress=(lambda rows: progress(rows, None)) if progress else None)
    ours = tuple(str(w.message) for w in caught if str(w.message).startswith("Minari dataset"))
    return Ingested(path, read_card(path), ours)


@dataclass(frozen=True)
class ParquetOptions:
    """The command-line form of a column mapping and of the card's extras (all optional)."""

    map: Sequence[str] = ()  # KEY=COLUMN
    mapping: Path | None = None  # TOML file with the same keys (the command line wins)
    obs_cols: Sequence[str] = ()
    next_obs_cols: Sequence[str] = ()
    action_cols: Sequence[str] = ()
    propensity_col: str | None = None
    propensity_kind: str | None = None
    done_means: str | None = None
    action_space: str | None = None  # discrete:N, box:LOW:HIGH:DIM or space JSON
    env: str | None = None
    env_kwargs: Sequence[str] = ()  # KEY=VALUE (JSON value)
    name: str | None = None
    description: str | None = None
    overwrite: bool = False
    bandit: bool = False
    categorical_cols: Sequence[str] = ()
    categories_from: Path | None = None
    actions: str = "executed"


def ingest_parquet_files(paths: Sequence[Path], out: Path, options: ParquetOptions,
                         progress: Progress | None = None) -> Ingested:
    """Convert foreign Parquet/CSV step logs with `data.parquet.ingest_parquet`."""
    from offpg_offline.data import parquet
    from offpg_offline.data.envspec import parse_env_kwargs

    cli_mapping = parquet.ColumnMapping(
        columns=parquet.parse_map(list(options.map)), obs_cols=tuple(options.obs_cols),
        next_obs_cols=tuple(options.next_obs_cols), action_cols=tuple(options.action_cols),
        propensity_col=options.propensity_col, propensity_kind=options.propensity_kind,
        done_means=options.done_means, categorical_cols=tuple(options.categorical_cols))
    mapping = (parquet.merge_mappings(parquet.load_mapping(options.mapping), cli_mapping)
               if options.mapping else cli_mapping)
    space = parquet.parse_action_space(options.action_space) if options.action_space else None
    kwargs = parse_env_kwargs(list(options.env_kwargs))
    files = parquet.input_files(paths)
    total = parquet.count_rows(files) if progress else None
    result = parquet.ingest_parquet(
        files, out, mapping=mapping, action_space=space, env_id=options.env, name=options.name,
        description=options.description, overwrite=options.overwrite,
        progress=(lambda rows: progress(rows, total)) if progress else None,
        bandit=options.bandit, categories_from=options.categories_from, env_kwargs=kwargs,
        actions=options.actions)
    return Ingested(result.path, result.card, tuple(result.warnings), per_file=True)


def dataset_report(dataset: Path, *, verify: bool = False) -> tuple[dict[str, Any], str | None]:
    """`data.info.dataset_info` and, when `verify` found problems, the sentence to fail with."""
    from offpg_offline.data.info import dataset_info

    result = dataset_info(dataset, verify=verify)
    if result["verify"] is not None and not result["verify"]["ok"]:
        problems = result["verify"]["problems"]
        return result, (f"{dataset}: --verify found {len(problems)} problem(s), "
                        f"the first: {problems[0]}")
    return result, None
