"""Environment specs with arguments: what a card's `env_spec` holds and how an env is built from it.

A card's `env_spec` is gymnasium's `EnvSpec.to_json()` as a dict: `id`, `kwargs` (the
constructor arguments, e.g. `{"continuous": true}` for LunarLander-v3), `max_episode_steps`,
`entry_point`, ... Minari datasets carry one; `offpg ingest parquet|csv` writes one from
`--env ID` plus `--env-kwargs key=value` (repeatable), or from `--env` given as EnvSpec JSON
(text or a `.json` file). Online evaluation (`rollout`) builds exactly that env with
`build_env`, so a log of `LunarLander-v3(continuous=True)` is evaluated in the continuous
variant, and an env that cannot be built is reported in one sentence naming the missing package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym


def parse_env_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """`--env-kwargs key=value` items → kwargs. A value is read as JSON (`true`, `3`, `0.5`,
    `[1, 2]`, `"text"`), Python's True/False/None, or else kept as text.

    Raises:
        ValueError: an item is not KEY=VALUE (the message names it).
    """
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--env-kwargs {item!r} is not KEY=VALUE (e.g. --env-kwargs "
                             f"continuous=true).")
        text = text.strip()
        python = {"True": True, "False": False, "None": None}
        if text in python:
            kwargs[key] = python[text]
            continue
        try:
            kwargs[key] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key] = text
    return kwargs


def _from_json_text(text: str, what: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: not valid EnvSpec JSON ({err.msg}, line {err.lineno}).") \
            from None
    if not isinstance(spec, dict) or not isinstance(spec.get("id"), str) or not spec["id"]:
        raise ValueError(f"{what}: an EnvSpec JSON object needs an 'id' (e.g. "
                         f'{{"id": "LunarLander-v3", "kwargs": {{"continuous": true}}}}).')
    if not isinstance(spec.get("kwargs") or {}, dict):
        raise ValueError(f"{what}: 'kwargs' must be an object.")
    return spec


def env_spec(env: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card's `env_spec` for `--env` (an id, EnvSpec JSON text, or a .json file holding it)
    and `--env-kwargs` (merged over the spec's own kwargs).

    For an id gymnasium has registered, the registered spec is completed (entry point, time
    limit, ...) and its kwargs updated; for an unknown id, the spec as given (`kwargs` only when
    some are given).

    Raises:
        ValueError: unreadable JSON, or a spec without an id.
    """
    text = env.strip()
    if text.startswith("{"):
        spec = _from_json_text(text, "--env")
    elif text.endswith(".json") and Path(text).is_file():
        spec = _from_json_text(Path(text).read_text(encoding="utf-8"), text)
    else:
        spec = {"id": text}
    merged = {**(spec.get("kwargs") or {}), **(kwargs or {})}
    try:
        registered = gym.spec(spec["id"])
    except gym.error.Error:
        registered = None
    if registered is None or not isinstance(registered.entry_point, str):
        return {**spec, **({"kwargs": merged} if merged else {})}
    full = json.loads(registered.to_json())
    full.update({k: v for k, v in spec.items() if k != "kwargs"})
    full["kwargs"] = {**full.get("kwargs", {}), **merged}
    return full


def build_env(spec: Any) -> tuple[gym.Env | None, str | None]:
    """Build an environment, or say in one sentence why it cannot be built.

    Args:
        spec: a gymnasium id (`"CartPole-v1"`), an `EnvSpec` or its JSON, or a card's
            `env_spec` dict (at least `"id"`; optional `"kwargs"`, `"max_episode_steps"`, and
            `"entry_point"`, used when the id is not registered).

    Returns:
        `(env, None)` on success, `(None, reason)` otherwise; the reason of a missing extra
        names the package (gymnasium's DependencyNotInstalled: "Box2D is not installed, ...").
    """
    if spec is None:
        return None, "the dataset records no environment (pass --env ID)"
    if isinstance(spec, gym.envs.registration.EnvSpec):
        spec = {"id": spec.id, "kwargs": dict(spec.kwargs),
                "max_episode_steps": spec.max_episode_steps, "entry_point": spec.entry_point}
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:  # an EnvSpec serialised by gymnasium's `EnvSpec.to_json` (as Minari stores it)
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            return None, f"cannot read the environment spec JSON ({err.msg})"
    if isinstance(spec, str):
        spec = {"id": spec}
    if not isinstance(spec, Mapping) or not spec.get("id"):
        return None, f"cannot read an environment id from {spec!r}"
    env_id = str(spec["id"])
    kwargs = dict(spec.get("kwargs") or {})
    if spec.get("max_episode_steps") is not None:
        kwargs["max_episode_steps"] = int(spec["max_episode_steps"])
    target: Any = env_id
    if env_id not in gym.registry and spec.get("entry_point"):
        target = gym.envs.registration.EnvSpec(id=env_id, entry_point=spec["entry_point"])
    described = env_id + (f" with {_kwargs_text(spec.get('kwargs'))}"
                          if spec.get("kwargs") else "")
    try:
        return gym.make(target, **kwargs), None
    except gym.error.DependencyNotInstalled as err:
        return None, f"environment {described} needs a missing dependency ({err})"
    except gym.error.Error as err:
        return None, f"environment {described} is not available ({err})"
    except Exception as err:  # an env's own constructor can raise anything (ImportError, ...)
        return None, f"environment {described} could not be built ({type(err).__name__}: {err})"


def _kwargs_text(kwargs: Any) -> str:
    if not isinstance(kwargs, Mapping):
        return repr(kwargs)
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


def check_env_option(env: str | None, option: str = "--env") -> None:
    """Refuse an env id the user typed (`--env`) that gymnasium does not know, before anything
    runs: a typo would otherwise only skip online evaluation. A registered env whose package is
    missing (LunarLander without Box2D), EnvSpec JSON, and `module:Env-v0` ids (gymnasium
    imports the module the user names) pass; a card's env is judged when it is built.

    Raises:
        ValueError: one sentence naming the option and the id.
    """
    if env is None or env.lstrip().startswith("{") or ":" in env or env in gym.registry:
        return
    close = sorted(known for known in gym.registry if known.split("-v")[0].lower()
                   == env.split("-v")[0].lower())
    hint = f"; did you mean {', '.join(close[:3])}?" if close else (
        "; check the id (e.g. CartPole-v1) or import the package that registers it")
    raise ValueError(f"{option} {env!r} is not a registered gymnasium environment{hint}")
