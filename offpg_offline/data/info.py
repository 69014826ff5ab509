"""What `offpg info` reports about a dataset, computed from its rows (streamed) and its card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from offpg_offline.data import schema as sc
from offpg_offline.data.card import check_part_types, verify_parts
from offpg_offline.data.store import (
    StatsAccumulator,
    iter_record_batches,
    read_card,
    verify_dataset,
)

_STAT_COLUMNS = [sc.EPISODE_ID, sc.REWARD, sc.TERMINATED, sc.TRUNCATED, *sc.PROPENSITY_COLUMNS]


def dataset_info(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """Counts, spaces, episode statistics, propensities and provenance of a dataset.

    Statistics are recomputed from the data by streaming five columns (bounded memory), not
    copied from the card; `card_counts_match` says whether the card's counts agree.

    Args:
        path: dataset folder.
        verify: also recompute every shard's sha256 against the card (`verify_dataset`).

    Returns:
        Plain JSON-serialisable dict. Propensity ranges are of the log-probability columns;
        for discrete actions `probability_range` gives the same range as probabilities.
    """
    path = Path(path)
    card = read_card(path)
    problems = verify_dataset(path) if verify else None
    if problems == []:  # bytes and sha256 match: also the footers (types, widths, action range)
        try:
            verify_parts(path, card)
        except sc.DataError as err:
            problems = [str(err)]
    stats = StatsAccumulator()
    if not problems:  # shards that fail verification may not even parse
        try:
            for batch in iter_record_batches(path, _STAT_COLUMNS):
                stats.update(batch)
        except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as err:
            check_part_types(path, card)  # a column of another type: names shard and column
            raise sc.DataError(f"{path}: a shard cannot be read ({_first_line(err)}); run "
                               f"offpg info --verify to check the files against the card."
                               ) from None
    summary = stats.summary()
    episodes = stats.lengths.count
    discrete = (card.get("action_space") or {}).get("type") == "Discrete"
    propensity: dict[str, Any] = {}
    for name in sc.PROPENSITY_COLUMNS:
        value_range = summary["propensity_range"][name]
        entry: dict[str, Any] = {
            "present": value_range is not None,
            "source": (card.get("propensity") or {}).get(name),
            "log_range": value_range,
        }
        if value_range is not None and discrete:
            entry["probability_range"] = {key: math.exp(value_range[key]) for key in ("min", "max")}
        propensity[name] = entry
    counts = {"episodes": episodes, "steps": stats.steps, "files": len(card["files"])}
    return {
        "path": str(path),
        "name": card.get("name"),
        "description": card.get("description", ""),
        "schema_version": card["schema_version"],
        "counts": counts,
        "card_counts_match": card.get("counts") == {"episodes": episodes, "steps": stats.steps},
        "observation_space": card.get("observation_space"),
        "action_space": card.get("action_space"),
        "env_spec": card.get("env_spec"),
        "decisions": "one per row (bandit)" if card.get("bandit") else "episodes",
        "categorical": card.get("categorical"),
        "actions": card.get("actions"),
        "env_action_space": card.get("env_action_space"),
        "episode_length": summary["episode_length"],
        "episode_return": summary["episode_return"],
        "episodes_terminated": summary["episodes_terminated"],
        "episodes_truncated": summary["episodes_truncated"],
        "propensity": propensity,
        "provenance": {"source": card.get("source"), "behavior": card.get("behavior")},
        "verify": None if problems is None else {"ok": not problems, "problems": problems},
    }


def _short(value: Any, width: int = 100) -> str:
    """One line of at most `width` characters (the JSON output has everything)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _space_text(space: dict[str, Any] | None) -> str:
    if not space:
        return "unknown"
    if space.get("type") == "Discrete":
        start = space.get("start", 0)
        return f"Discrete({space['n']})" + (f" starting at {start}" if start else "")
    if space.get("type") == "Box":
        low, high = space.get("low", []), space.get("high", [])
        bounds = (f"[{low[0]}, {high[0]}]" if len(set(map(str, low))) == 1
                  and len(set(map(str, high))) == 1 and low else "per-dimension bounds")
        return f"Box(shape={tuple(space['shape'])}, {bounds}, {space.get('dtype', 'float32')})"
    return str(space.get("type"))


def _range_text(values: dict[str, float] | None, digits: int = 3) -> str:
    if values is None:
        return "none"
    return (f"min {values['min']:.{digits}g}, mean {values['mean']:.{digits}g}, "
            f"max {values['max']:.{digits}g}")


def _foreign_lines(info: dict[str, Any]) -> list[str]:
    """Lines for what a foreign log's ingest options recorded (bandit, categories, actions)."""
    lines = []
    if info.get("decisions", "episodes") != "episodes":
        lines.append(f"decisions: {info['decisions']}")
    if info.get("actions"):
        lines.append(f"actions: {info['actions'].get('semantics')} samples; rollouts clip to "
                     f"{_space_text(info.get('env_action_space'))}")
    for column in (info.get("categorical") or {}).get("columns", []):
        lines.append(f"categorical {column['column']}: {len(column['values'])} values + unknown, "
                     f"obs[{column['offset']}:{column['offset'] + column['width']}]")
    return lines


def format_info(info: dict[str, Any]) -> str:
    """`dataset_info` as the human-readable text `offpg info` prints."""
    counts = info["counts"]
    spec = info.get("env_spec") or {}
    env = spec.get("id", "none recorded")
    if spec.get("kwargs"):
        env += " with " + ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    lines = [
        f"{info['name']}  ({info['path']}, schema v{info['schema_version']})",
    ]
    if info.get("description"):
        lines.append(f"  {info['description']}")
    lines += [
        f"steps {counts['steps']:,} in {counts['episodes']:,} episodes, {counts['files']} file(s)"
        + ("" if info["card_counts_match"] else "  (the card's counts DIFFER from the data)"),
        f"observation space: {_space_text(info['observation_space'])}",
        f"action space: {_space_text(info['action_space'])}",
        *_foreign_lines(info),
        f"environment: {env}",
        f"episode length: {_range_text(info['episode_length'], 4)}",
        f"episode return: {_range_text(info['episode_return'], 4)}",
        f"episode ends: {info['episodes_terminated']:,} terminated, "
        f"{info['episodes_truncated']:,} truncated",
    ]
    for name, entry in info["propensity"].items():
        if not entry["present"]:
            lines.append(f"{name}: absent")
            continue
        source = (entry["source"] or {}).get("source", "unspecified")
        text = f"{name}: present ({source}); log range {_range_text(entry['log_range'])}"
        if "probability_range" in entry:
            pr = entry["probability_range"]
            text += f"; probabilities {pr['min']:.3g}..{pr['max']:.3g}"
        lines.append(text)
    source = info["provenance"]["source"] or {}
    if source:
        kind = source.get("kind") or source.get("type")
        lines.append(f"source: {kind}" if kind else "source:")
        files = source.get("files")
        if files:
            shown = ", ".join(str(f.get("path", f)) for f in files[:3])
            lines.append(f"  files: {len(files)}: {shown}" + (", ..." if len(files) > 3 else ""))
        lines += [f"  {key}: {_short(value)}" for key, value in source.items()
                  if key not in ("kind", "type", "files")]
    behavior = info["provenance"]["behavior"]
    if isinstance(behavior, dict):
        lines.append("behavior policy:")
        lines += [f"  {key}: {_short(value)}" for key, value in behavior.items()]
    elif behavior:
        lines.append(f"behavior policy: {_short(behavior)}")
    if info["verify"] is not None:
        if info["verify"]["ok"]:
            lines.append("verify: every shard matches its sha256 and row count in the card")
        else:
            lines += [f"verify: {problem}" for problem in info["verify"]["problems"]]
    return "\n".join(lines)
