"""The best configuration of a study: summary, ``best.toml``, and the study's state."""

from __future__ import annotations

import datetime as dt
import platform
import socket
import statistics
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import tomlkit
from optuna.trial import FrozenTrial, TrialState

from sweeper import __version__
from sweeper.atomic import write_text
from sweeper.config import StudyConfig
from sweeper.plugins import trial_seed
from sweeper.run.overfitting import describe as describe_overfit
from sweeper.run.weights import load_hint
from sweeper.store import (
    CONFIRMS,
    confirmation_groups,
    confirms,
    counts,
    first_value,
    named_values,
    numbers_with_user_attr,
    outcome,
    pareto_front,
    running_trials,
)
from sweeper.store import best_trial as best_complete_trial

PACKAGES = ("optuna", "torch", "lightning", "torchmetrics", "transformers")


def record_at_best(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's history record at its best validation (the last one if unknown)."""
    history = trial.user_attrs.get("history", [])
    step = trial.user_attrs.get("best_step")
    return next((r for r in history if r.get("step") == step), history[-1] if history else {})


def confirmed(study: optuna.Study) -> list[dict[str, Any]]:
    """Each configuration the study confirmed (``[confirm]``), best first.

    One entry per confirmed search trial: its number and params, and the
    mean and sample standard deviation of the values of the trial and its
    finished confirmations, each run listed with its seed. A run that
    diverged has no value and counts as the worst: a configuration with
    diverged runs ranks below every configuration with fewer. A
    configuration whose confirmations are still waiting or running ranks
    below those whose are all finished, so a half-confirmed lucky value is
    never chosen. Then the best mean wins; ties go to the earlier trial.
    """
    if not numbers_with_user_attr(study, CONFIRMS):  # one query: most studies have none
        return []
    trials = study.get_trials(deepcopy=False)
    groups = confirmation_groups(trials)
    pending = {
        mark[0]
        for t in trials
        if t.state in (TrialState.RUNNING, TrialState.WAITING) and (mark := confirms(t))
    }
    entries: list[dict[str, Any]] = []
    for number, runs in groups.items():
        original = trials[number]  # a study's trials are numbered 0, 1, ... in order
        if original.value is None:
            continue
        listed = [
            {
                "trial": run.number,
                "seed": run.user_attrs.get("seed"),
                "confirm_seed": run.user_attrs.get("confirm_seed", 0),
                "value": run.value if outcome(run) != "diverged" else None,
                "outcome": outcome(run),
            }
            for run in [original, *runs]
        ]
        values = [run["value"] for run in listed if run["value"] is not None]
        entries.append(
            {
                "trial": number,
                "params": original.params,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "diverged": len(listed) - len(values),
                "runs": listed,
            }
        )
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    entries.sort(
        key=lambda e: (
            e["trial"] in pending,
            e["diverged"],
            -e["mean"] if maximize else e["mean"],
            e["trial"],
        )
    )
    return entries


def runs_counted(entry: dict[str, Any]) -> str:
    """``3 runs``, or ``2 of 3 runs`` when one diverged: what an entry of :func:`confirmed`
    averages over."""
    total = len(entry["runs"])
    valued = total - entry["diverged"]
    return f"{valued} runs" if valued == total else f"{valued} of {total} runs"


def best_trial(
    study: optuna.Study, found: list[dict[str, Any]] | None = None
) -> FrozenTrial | None:
    """The best trial: with confirmations, the confirmed configuration with the best mean
    (its search trial); else the best COMPLETE trial. ``found``: :func:`confirmed`, if read."""
    found = confirmed(study) if found is None else found
    if found:
        return study.get_trials(deepcopy=False)[found[0]["trial"]]
    return best_complete_trial(study)


def summary(config: StudyConfig, study: optuna.Study) -> dict[str, Any]:
    """What ``sweeper best`` shows: the best trial, its metrics, counts, how to reproduce."""
    found = confirmed(study)
    best = best_trial(study, found)
    result: dict[str, Any] = {
        "study": config.study.name,
        "direction": config.study.direction,
        "metric": config.study.metric,
        "counts": counts(study),
        "n_trials": config.study.n_trials,
        "overfit_trials": numbers_with_user_attr(study, "overfit"),
        "confirmation_trials": sum(len(entry["runs"]) - 1 for entry in found),
        "best": None,
        "confirmed": found,
    }
    if config.study.multi_objective:
        result["pareto"] = [
            {
                "number": t.number,
                "values": named_values(config.study.metrics, t),
                "params": t.params,
            }
            for t in pareto_front(study)
        ]
    if best is None:
        return result
    step = best.user_attrs.get("best_step")
    at_best = record_at_best(best)
    result["best"] = {
        "trial": best.number,
        "value": first_value(best),
        "params": best.params,
        "fixed": {k: v for k, v in config.search.items() if not isinstance(v, dict)},
        "step": step,
        "epoch": best.user_attrs.get("best_epoch"),
        "metrics": {k: v for k, v in at_best.items() if k not in {"step", "epoch"}},
        "duration_s": _seconds(best),
        "stop_reason": best.user_attrs.get("stop_reason"),
        "gap": best.user_attrs.get("gap", {}),
        "overfit": best.user_attrs.get("overfit"),
        "weights": _kept_weights(best),
        "confident_errors": best.user_attrs.get("confident_errors", []),
        "confirmed": found[0] if found else None,
        **(
            {"values": named_values(config.study.metrics, best)}
            if config.study.multi_objective
            else {}
        ),
        "reproduce": {
            "study_file": str(config.path),
            "study_seed": config.study.seed,
            "trial_number": best.number,
            "trial_seed": trial_seed(config.study.seed, best.number),
            "versions": versions(),
        },
    }
    return result


def _kept_weights(trial: FrozenTrial) -> str | None:
    """The file of the trial's kept weights, unless it is gone from this machine.

    A trial chosen by its confirmations' mean may have been pushed out of
    the ``keep_weights`` best by value after its weights were saved. The
    weights of a trial another machine ran are on that machine: named as
    they are.
    """
    path = trial.user_attrs.get("weights")
    if not isinstance(path, str):
        return None
    here = trial.user_attrs.get("host") in (None, socket.gethostname())
    return None if here and not Path(path).is_file() else path


def versions() -> dict[str, str]:
    """Versions of Python, sweeper and the packages a trial depends on."""
    found = {"python": platform.python_version(), "sweeper": __version__}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_best_toml(config: StudyConfig, data: dict[str, Any]) -> Path | None:
    """Write ``<folder>/<name>/best.toml`` atomically; None when nothing completed."""
    best = data["best"]
    if best is None:
        return None
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"Best configuration of study {config.study.name!r}, by sweeper."))
    doc.add(tomlkit.comment("[params] holds what to put back into [search] to train it again."))
    if config.study.multi_objective:
        doc.add(
            tomlkit.comment(
                f"Several metrics: [best] is the Pareto front's best {config.study.metrics[0]}; "
                "[[pareto]] lists the whole front."
            )
        )
    head = tomlkit.table()
    head.add("metric", config.study.metric)
    head.add("value", best["value"])
    if "values" in best:
        head.add("values", _table(best["values"]))
    head.add("trial", best["trial"])
    for key in ("step", "epoch", "duration_s", "stop_reason", "weights"):
        if best[key] is not None:
            head.add(key, best[key])
    hint = load_hint({**best["fixed"], **best["params"]}) if best["weights"] else None
    if hint is not None:
        head.add("load", hint)
    doc.add("best", head)
    doc.add("params", _table({**best["fixed"], **best["params"]}))
    doc.add("metrics", _table(best["metrics"]))
    if best.get("confirmed"):
        doc.add("confirmed", _confirmed_table(best["confirmed"]))
    if "pareto" in data:
        doc.add("pareto", _pareto_table(data["pareto"], best["fixed"]))
    if best["gap"] or best["overfit"]:
        view = _table({f"gap_{name}": value for name, value in best["gap"].items()})
        view.add("overfit", best["overfit"] is not None)
        if best["overfit"] is not None:
            view.add("overfit_detail", describe_overfit(best["overfit"], config.study.metrics[0]))
        doc.add("overfitting", view)
    reproduce = dict(best["reproduce"])
    version_table = _table(reproduce.pop("versions"))
    reproduce_table = _table(reproduce)
    reproduce_table.add("versions", version_table)
    doc.add("reproduce", reproduce_table)
    return write_text(config.output_dir / "best.toml", tomlkit.dumps(doc))


def _confirmed_table(entry: dict[str, Any]) -> Any:
    """The confirmed best's spread: mean and standard deviation, then one ``[[confirmed.runs]]``
    per run (trial, seed, value; ``outcome = "diverged"`` and no value for a diverged run)."""
    table = tomlkit.table()
    table.add(
        tomlkit.comment(
            "chosen by the mean over the search trial and its confirmations; "
            "a diverged run counts as the worst"
        )
    )
    table.add("mean", entry["mean"])
    table.add("std", entry["std"])
    runs = tomlkit.aot()
    for run in entry["runs"]:
        row = tomlkit.table()
        row.add("trial", run["trial"])
        if run["seed"] is not None:
            row.add("seed", run["seed"])
        if run["value"] is not None:
            row.add("value", run["value"])
        row.add("outcome", run["outcome"])
        runs.append(row)
    table.add("runs", runs)
    return table


def _pareto_table(front: list[dict[str, Any]], fixed: dict[str, Any]) -> Any:
    """One ``[[pareto]]`` per trial of the front: its number, values by metric, and params
    (with ``[search]``'s fixed values, as ``[params]``)."""
    rows = tomlkit.aot()
    for entry in front:
        row = tomlkit.table()
        row.add("trial", entry["number"])
        row.add("values", _table(entry["values"]))
        row.add("params", _table({**fixed, **entry["params"]}))
        rows.append(row)
    return rows


def _table(values: dict[str, Any]) -> Any:
    table = tomlkit.table()
    for key, value in values.items():
        if value is not None:
            table.add(key, value)
    return table


def _seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 3)


def running(study: optuna.Study) -> list[dict[str, Any]]:
    """The trials under way: number, device, host, elapsed seconds, last validation."""
    now = dt.datetime.now()
    rows = []
    for trial in running_trials(study):
        history = trial.user_attrs.get("history", [])
        started = trial.datetime_start
        rows.append(
            {
                "trial": trial.number,
                "device": trial.user_attrs.get("device"),
                "host": trial.user_attrs.get("host"),
                "elapsed_s": round((now - started).total_seconds(), 1) if started else None,
                "last": history[-1] if history else None,
                "params": trial.params,
            }
        )
    return rows
