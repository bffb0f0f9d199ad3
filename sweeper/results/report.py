"""The study as one self-contained HTML file of plotly charts (plotly.js inlined)."""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.atomic import write_text
from sweeper.config import StudyConfig
from sweeper.results.best import best_trial, confirmed, record_at_best, runs_counted
from sweeper.results.progress import describe_values
from sweeper.run.overfitting import describe as describe_overfit
from sweeper.space import parse_space
from sweeper.store import (
    first_value,
    has_ended,
    intermediate_values,
    outcome,
    pareto_front,
    read_trials,
)

OUTCOME_COLOURS = {
    "complete": "#1f77b4",
    "pruned": "#ff7f0e",
    "diverged": "#d62728",
    "failed": "#7f7f7f",
}
TOP_K = 5
MAX_LINES = 2000
"""Learning curves drawn at most; a larger study shows an even sample of its trials."""
SAMPLE = 500
"""Complete trials behind the importances and the parallel coordinates at most."""


def compute(trials: Sequence[FrozenTrial]) -> dict[str, float]:
    """Optimizer steps and device-seconds spent, and steps saved by stopping trials early.

    A trial stopped early saved the steps a complete trial ran and it did not.
    """
    finished = [t for t in trials if has_ended(t)]
    full = max(
        (t.user_attrs.get("steps", 0) for t in finished if t.state == TrialState.COMPLETE),
        default=0,
    )
    steps = sum(t.user_attrs.get("steps", 0) for t in finished)
    saved = sum(
        max(0, full - t.user_attrs.get("steps", 0))
        for t in finished
        if t.state == TrialState.PRUNED
    )
    seconds = sum(t.user_attrs.get("fit_seconds", 0.0) for t in finished)
    return {
        "steps": steps,
        "saved_steps": saved,
        "device_seconds": seconds,
        "saved_share": saved / (steps + saved) if steps + saved else 0.0,
    }


def duration(trials: Sequence[FrozenTrial]) -> dt.timedelta:
    """From the first trial's start to the last trial's end."""
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)) if starts and ends else dt.timedelta(0)


def build_report(
    config: StudyConfig, study: optuna.Study, earlier: Sequence[tuple[str, str]] = ()
) -> str:
    """The HTML text of the report; ``earlier`` links (label, href) to earlier nights."""
    from plotly.offline import get_plotlyjs

    trials = read_trials(study)
    sections = [_summary(config, study, trials), _confirmed(config, study)]
    if earlier:
        items = "".join(
            f'<li><a href="{html.escape(href)}">{html.escape(label)}</a></li>'
            for label, href in earlier
        )
        sections.append(
            f'<section id="earlier-nights"><h2>Earlier nights</h2><ul>{items}</ul></section>'
        )
    for title, figure in _figures(config, study, trials):
        body = figure.to_html(
            full_html=False, include_plotlyjs=False, config={"displaylogo": False}
        )
        sections.append(f'<section class="chart"><h2>{html.escape(title)}</h2>{body}</section>')
    sections.append(_label_suspects(study))
    name = html.escape(config.study.name)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>sweeper report: {name}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}section{margin-bottom:2em}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>"
        f"<h1>Study {name}</h1>{''.join(sections)}</body></html>"
    )


def write_report(
    config: StudyConfig,
    study: optuna.Study,
    path: Path | None = None,
    earlier: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the report atomically; default ``<folder>/<name>/report.html``."""
    return write_text(
        path or config.output_dir / "report.html", build_report(config, study, earlier)
    )


def _summary(config: StudyConfig, study: optuna.Study, trials: Sequence[FrozenTrial]) -> str:
    counts = {name: 0 for name in OUTCOME_COLOURS}
    for trial in trials:
        if has_ended(trial):
            counts[outcome(trial)] += 1
    spent = compute(trials)
    rows = [
        (
            "metrics" if config.study.multi_objective else "metric",
            ", ".join(
                f"{m} ({d})"
                for m, d in zip(config.study.metrics, config.study.directions, strict=True)
            ),
        ),
        ("trials", ", ".join(f"{n} {name}" for name, n in counts.items())),
        ("duration", str(duration(trials)).split(".")[0]),
        (
            "compute spent",
            f"{spent['steps']:,} optimizer steps, {spent['device_seconds']:,.0f} device-seconds",
        ),
        (
            "saved by stopping early",
            f"{spent['saved_steps']:,} steps ({100 * spent['saved_share']:.0f} %)",
        ),
    ]
    overfit = [str(t.number) for t in trials if has_ended(t) and "overfit" in t.user_attrs]
    listed = ", ".join(overfit[:30]) + (" …" if len(overfit) > 30 else "")
    rows.append(
        (
            "trials that overfit",
            f"{len(overfit)}: {listed}"
            if overfit
            else "none (no validation metric peaked and then fell while the train loss fell)",
        )
    )
    confirmations = confirmed(study)
    best = best_trial(study, confirmations)
    if best is not None:
        value = f"{first_value(best):.6g} (trial {best.number})"
        if config.study.multi_objective:
            front = pareto_front(study)
            numbers = ", ".join(str(t.number) for t in front[:30]) + (
                " …" if len(front) > 30 else ""
            )
            rows.insert(0, ("Pareto front", f"{len(front)} trials: {numbers}"))
            value = f"{describe_values(config.study.metrics, best.values)} (trial {best.number}, "
            value += "the front's best "
            value += f"{config.study.metrics[0]})"
        if confirmations:
            entry = confirmations[0]
            value += f"; mean over {runs_counted(entry)} {entry['mean']:.6g} ± {entry['std']:.3g}"
        rows.insert(0, ("best value", value))
        rows.insert(
            1, ("best params", ", ".join(f"{k} = {_short(v)}" for k, v in best.params.items()))
        )
        gaps = best.user_attrs.get("gap", {})
        if gaps:
            text = ", ".join(f"{k} {v:+.4f}" for k, v in gaps.items())
            found = best.user_attrs.get("overfit")
            if found:
                text += f"; it overfit: {describe_overfit(found, config.study.metrics[0])}"
            rows.insert(2, ("best trial's train/val gap", text))
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
    )
    return f'<section id="summary"><h2>Summary</h2><table>{cells}</table></section>'


def _confirmed(config: StudyConfig, study: optuna.Study) -> str:
    """The confirmed configurations (``[confirm]``): mean ± std and each run's seed and value."""
    found = confirmed(study)
    if not found:
        return ""
    rows = []
    for entry in found:
        runs = "<br>".join(
            html.escape(
                f"trial {run['trial']}, seed {run['seed']}: "
                + (f"{run['value']:.6g}" if run["value"] is not None else str(run["outcome"]))
            )
            for run in entry["runs"]
        )
        params = ", ".join(f"{k} = {_short(v)}" for k, v in entry["params"].items())
        cells = (
            html.escape(str(entry["trial"])),
            html.escape(f"{entry['mean']:.6g} ± {entry['std']:.3g}"),
            runs,
            html.escape(params),
        )
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("trial", "mean ± std", "runs", "params"))
    return (
        '<section id="confirmed"><h2>Confirmed configurations</h2>'
        f"<p>The best configurations of the search, each run again with new seeds; the best "
        f"is chosen by the mean of {html.escape(config.study.metrics[0])} over its runs. A run "
        "that diverged counts as the worst: a configuration with diverged runs ranks below "
        "every configuration with fewer.</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table></section>"
    )


def _label_suspects(study: optuna.Study) -> str:
    """The val examples the best trial gets wrong most confidently: likely label errors."""
    best = best_trial(study)
    errors = best.user_attrs.get("confident_errors", []) if best is not None else []
    if not errors:
        return ""
    cells = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(e[key]))}</td>"
            for key in ("where", "text", "label", "predicted", "confidence")
        )
        + "</tr>"
        for e in errors
    )
    head = "".join(f"<th>{h}</th>" for h in ("where", "text", "label", "predicted", "confidence"))
    return (
        '<section id="label-suspects"><h2>Likely label errors</h2>'
        f"<p>Val examples the best trial ({best.number if best else ''}) gets wrong with the "
        f"most confidence, at its best validation.</p><table><tr>{head}</tr>{cells}</table>"
        "</section>"
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _figures(
    config: StudyConfig, study: optuna.Study, trials: Sequence[FrozenTrial]
) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go
    from optuna import visualization as vis

    finished = [t for t in trials if has_ended(t)]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    figures: list[tuple[str, Any]] = []
    if complete:
        figures.append(("Optimization history", _history(config, complete, go)))
    if config.study.multi_objective and complete and len(config.study.metrics) <= 3:
        figures.append(
            (
                "Pareto front",
                vis.plot_pareto_front(
                    study, target_names=list(config.study.metrics), include_dominated_trials=True
                ),
            )
        )
    figures.append(("Learning curves", learning_curves(config, finished)))
    if len(complete) >= 2 and len(complete[0].distributions) >= 1:
        sample, note = _sample(study, complete)
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        first = _first_target(config)
        if config.study.multi_objective:
            note += f" (by {config.study.metrics[0]})"
        with contextlib.suppress(ValueError, RuntimeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "importances will be equal" with few trials
            figures.append(
                (
                    f"Parameter importances{note}",
                    vis.plot_param_importances(
                        sample, evaluator=evaluator, **_first_target(config, minimized=True)
                    ),
                )
            )
        shared, apart = _shared_params(sample.trials)
        if apart:
            # A line through the axis of a parameter a trial lacks would read as a value.
            note += f" ({', '.join(apart)}: conditional, charted below)"
        figures.append(
            (
                f"Parallel coordinates{note}",
                vis.plot_parallel_coordinate(sample, params=shared if apart else None, **first),
            )
        )
    space = parse_space(config.search, config.path)
    for name in _params_by_interest(finished):
        when = f" (trials where {space.describe(name)})" if name in space.conditions else ""
        figures.append(
            (f"{name} against outcome{when}", _param_outcome(config, finished, name, go))
        )
    top = sorted(complete, key=lambda t: first_value(t) or 0.0, reverse=config.study.maximize)[
        :TOP_K
    ]
    if top:
        figures.append(
            ("Train and validation loss of the top trials (overfitting)", _train_vs_val(top, go))
        )
        figures.append((f"Metrics of the best trial ({top[0].number})", _best_metrics(top[0], go)))
    return figures


def _sample(study: optuna.Study, complete: Sequence[FrozenTrial]) -> tuple[optuna.Study, str]:
    """An in-memory study of an even sample of the complete trials: params and values only.

    Importances and parallel coordinates cost time in the number of trials and
    in what each carries, and say no more with 10,000 lines than with 500.
    """
    stride = max(1, math.ceil(len(complete) / SAMPLE))
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            values=t.values,
            params=t.params,
            distributions=t.distributions,
        )
        for t in complete[::stride]
    )
    note = f" (every {stride}th of {len(complete):,} complete trials)" if stride > 1 else ""
    return copy, note


def _shared_params(trials: Sequence[FrozenTrial]) -> tuple[list[str], list[str]]:
    """The parameters every trial has, and those only some have (a conditional space)."""
    every = set.intersection(*(set(t.params) for t in trials)) if trials else set()
    some = {name for t in trials for name in t.params}
    return sorted(every), sorted(some - every)


def learning_curves(config: StudyConfig, trials: Sequence[FrozenTrial]) -> Any:
    """The study metric of every finished trial against the step, coloured by outcome."""
    import plotly.graph_objects as go

    trials = [t for t in trials if has_ended(t)]
    figure = go.Figure(layout={"title": "Learning curves by outcome"})
    stride = max(1, math.ceil(len(trials) / MAX_LINES))
    for name, colour in OUTCOME_COLOURS.items():
        xs: list[float | None] = []
        ys: list[float | None] = []
        for trial in trials[::stride]:
            reported = intermediate_values(trial)
            if outcome(trial) != name or not reported:
                continue
            steps = sorted(reported)
            xs += [*steps, None]
            ys += [*(reported[s] for s in steps), None]
        if xs:
            figure.add_trace(
                go.Scattergl(
                    x=xs,
                    y=ys,
                    mode="lines",
                    name=name,
                    line={"color": colour, "width": 1},
                    opacity=0.6,
                )
            )
    figure.update_layout(xaxis_title="step", yaxis_title=config.study.metrics[0])
    return figure


def _history(config: StudyConfig, complete: Sequence[FrozenTrial], go: Any) -> Any:
    """Each complete trial's value by trial number, and the best so far."""
    ordered = sorted(complete, key=lambda t: t.number)
    values = [value if (value := first_value(t)) is not None else math.nan for t in ordered]
    pick = max if config.study.maximize else min
    best: list[float] = []
    for value in values:
        best.append(value if not best else pick(best[-1], value))
    numbers = [t.number for t in ordered]
    figure = go.Figure()
    figure.add_trace(
        go.Scattergl(
            x=numbers,
            y=values,
            mode="markers",
            name="value",
            marker={"color": OUTCOME_COLOURS["complete"], "size": 5},
        )
    )
    figure.add_trace(
        go.Scattergl(
            x=numbers, y=best, mode="lines", name="best so far", line={"color": "#2ca02c"}
        )
    )
    figure.update_layout(xaxis_title="trial", yaxis_title=config.study.metrics[0])
    return figure


def _params_by_interest(trials: Sequence[FrozenTrial]) -> list[str]:
    """Learning-rate-like parameters first, then the rest."""
    names = sorted({name for t in trials for name in t.params})
    return sorted(names, key=lambda n: (0 if n in {"lr", "learning_rate"} else 1, n))


def _param_outcome(config: StudyConfig, trials: Sequence[FrozenTrial], name: str, go: Any) -> Any:
    figure = go.Figure()
    for kind, colour in OUTCOME_COLOURS.items():
        chosen = [t for t in trials if outcome(t) == kind and name in t.params]
        if not chosen:
            continue
        values = [_last_value(t) for t in chosen]
        figure.add_trace(
            go.Scattergl(
                x=[t.params[name] for t in chosen],
                y=values,
                mode="markers",
                name=kind,
                marker={
                    "color": colour,
                    "size": 7,
                    "symbol": "x" if kind in {"diverged", "failed"} else "circle",
                },
                text=[f"trial {t.number}: {t.user_attrs.get('stop_reason', '')}" for t in chosen],
            )
        )
    dist = next((t.distributions[name] for t in trials if name in t.distributions), None)
    log = bool(getattr(dist, "log", False))
    figure.update_layout(
        xaxis_title=name,
        xaxis_type="log" if log else "linear",
        yaxis_title=f"{config.study.metrics[0]} (last reported)",
    )
    return figure


def _last_value(trial: FrozenTrial) -> float | None:
    found = first_value(trial)
    if found is not None:
        return found
    reported = intermediate_values(trial)
    if reported:
        value = reported[max(reported)]
        return value if math.isfinite(value) else None
    return None


def _first_target(config: StudyConfig, minimized: bool = False) -> dict[str, Any]:
    """For Optuna's charts of one objective: the first metric, in a study of several.

    ``minimized``: for the importance evaluators, which take a target as a value
    to minimize (a metric to maximize is negated; the chart shows no values).
    """
    if not config.study.multi_objective:
        return {}
    sign = -1.0 if minimized and config.study.maximize else 1.0
    return {"target": lambda t: sign * t.values[0], "target_name": config.study.metrics[0]}


def _train_vs_val(top: Sequence[FrozenTrial], go: Any) -> Any:
    figure = go.Figure()
    for trial in top:
        history = trial.user_attrs.get("history", [])
        steps = [r["step"] for r in history]
        for key, dash in (("train_loss", "dot"), ("val_loss", "solid")):
            if any(key in r for r in history):
                figure.add_trace(
                    go.Scatter(
                        x=steps,
                        y=[r.get(key) for r in history],
                        mode="lines+markers",
                        line={"dash": dash},
                        name=f"trial {trial.number} {key}",
                    )
                )
    figure.update_layout(xaxis_title="step", yaxis_title="loss")
    return figure


def best_curves(config: StudyConfig, study: optuna.Study) -> Any:
    """Every validation metric of the best trial against the step; None before one completes."""
    import plotly.graph_objects as go

    best = best_trial(study)
    if best is None:
        return None
    history = best.user_attrs.get("history", [])
    steps = [r["step"] for r in history]
    figure = go.Figure(layout={"title": f"Validation metrics of the best trial ({best.number})"})
    names = sorted({k for r in history for k in r if k.startswith("val_") and k != "val_loss"})
    for name in names:
        figure.add_trace(
            go.Scatter(x=steps, y=[r.get(name) for r in history], mode="lines+markers", name=name)
        )
    figure.update_layout(xaxis_title="step")
    return figure


def _best_metrics(best: FrozenTrial, go: Any) -> Any:
    step = best.user_attrs.get("best_step")
    record = record_at_best(best)
    names = [k for k in record if k.startswith("val_") and k != "val_loss"]
    figure = go.Figure(
        go.Bar(x=names, y=[record[k] for k in names], text=[f"{record[k]:.3f}" for k in names])
    )
    figure.update_layout(yaxis_range=[0, 1], yaxis_title=f"at step {step}")
    return figure
