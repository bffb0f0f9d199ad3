"""``study.toml`` to a typed, frozen config; the only module that reads TOML."""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from sweeper.errors import ConfigError, SweeperError

SAMPLERS = ("tpe", "random", "gp", "cmaes", "qmc", "grid")
INTERNAL = ("path", "night")
"""StudyConfig fields that are not keys of the study file."""
PRUNERS = ("median", "incumbent", "percentile", "hyperband", "asha", "threshold", "none")
NAME_MAX = 100
"""Longest study name: it names files and folders, with a night's date added."""
LARGEST = 2**53
"""Largest integer a study file may hold: JSON (the dashboard) keeps no larger one exactly."""
MAX_BYTES = 2**20
"""Largest study file read: a study file is a few kilobytes; /dev/zero is endless."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FROM_ENV = "env:"
"""``storage = "env:NAME"``: the storage URL is the value of environment variable NAME."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TRACKING_OPTIONS = {
    "dir": ("tensorboard", "wandb"),
    "tracking_uri": ("mlflow",),
    "experiment": ("mlflow",),
    "project": ("wandb",),
    "entity": ("wandb",),
    "mode": ("wandb",),
}
"""``[tracking]`` options and the backends that take each."""
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_WANDB_FORBIDDEN = set("/\\#?%:")

_STRICT = ConfigDict(frozen=True, strict=True, allow_inf_nan=False)
"""No coercion: ``true`` is not 1 and ``"3"`` is not 3; floats take ints, not nan or inf."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)


Direction = Literal["maximize", "minimize"]
MetricName = Annotated[str, Field(min_length=1, max_length=200)]
MAX_OBJECTIVES = 8
"""Most metrics one study optimizes at once."""


class StudySection(_Section):
    name: str
    metric: (
        MetricName | Annotated[list[MetricName], Field(min_length=1, max_length=MAX_OBJECTIVES)]
    )
    """The metric the task logs during validation (`self.log(...)`) that the study optimizes;
    a trial's value is its best validation value. A list of names makes a study of several
    objectives, with a Pareto front; the pruner watches the first."""
    direction: (
        Direction | Annotated[list[Direction], Field(min_length=1, max_length=MAX_OBJECTIVES)]
    )
    """Whether a larger (`maximize`) or a smaller (`minimize`) value of `metric` is better;
    a list of them, one per metric, when `metric` is a list."""
    n_trials: PositiveInt
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    storage: str | None = None
    keep_weights: int = Field(default=1, ge=0)
    max_failures: PositiveInt = 10

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if "@" in value:
            raise ValueError(
                "'@' is kept for the studies of nights (<name>@YYYY-MM-DD); choose a name "
                "without it"
            )
        if len(value) > NAME_MAX:
            raise ValueError(
                f"at most {NAME_MAX} characters (it names the storage file and the output "
                f"folder), got {len(value)}"
            )
        if not _NAME.match(value):
            raise ValueError(
                "letters, digits, '_', '.' and '-' only, beginning with a letter or digit; "
                f"got {shown(value)}"
            )
        return value

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_storage(value)
        return value

    @field_validator("metric")
    @classmethod
    def _distinct_metrics(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(set(value)) < len(value):
            twice = sorted({name for name in value if value.count(name) > 1})
            raise ValueError(
                f"each metric once; {', '.join(map(repr, twice))} is listed more than once"
            )
        if isinstance(value, list) and len(value) == 1:
            return value[0]  # a list of one is the study of that one metric
        return value

    @field_validator("direction")
    @classmethod
    def _one_direction_per_metric(cls, value: str | list[str], info: ValidationInfo) -> Any:
        metric = info.data.get("metric")
        if metric is None:
            return value  # metric is wrong itself; its message says so
        if isinstance(value, list) and len(value) == 1 and isinstance(metric, str):
            value = value[0]  # one metric (a list of one is one), one direction
        wanted = len(metric) if isinstance(metric, list) else None
        given = len(value) if isinstance(value, list) else None
        if wanted != given:
            listed = "a list of 1" if wanted == 1 else f"a list of {wanted}"
            raise ValueError(
                "one direction per metric: metric is "
                f"{'one name' if wanted is None else listed}, so direction must be "
                f"{'one of maximize, minimize' if wanted is None else listed + ' directions'}"
                f" (got {shown(value)})"
            )
        return value

    @property
    def metrics(self) -> tuple[str, ...]:
        """The study's metrics, the first one first (the one the pruner watches)."""
        return tuple(self.metric) if isinstance(self.metric, list) else (self.metric,)

    @property
    def directions(self) -> tuple[Direction, ...]:
        """One direction per metric of :attr:`metrics`."""
        return tuple(self.direction) if isinstance(self.direction, list) else (self.direction,)

    @property
    def multi_objective(self) -> bool:
        """Several metrics: trials are compared by Pareto dominance, no single best."""
        return len(self.metrics) > 1

    @property
    def maximize(self) -> bool:
        """The first metric's direction is up."""
        return self.directions[0] == "maximize"


class TaskSection(BaseModel):
    """``name`` picks the task; every other key is an option of that task."""

    model_config = ConfigDict(extra="allow", **_STRICT)
    name: str = Field(min_length=1, max_length=200)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PluginSection(BaseModel):
    """A sampler or pruner: ``name`` plus constructor options."""

    model_config = ConfigDict(extra="allow", **_STRICT)
    name: str = Field(max_length=200)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DivergenceSection(_Section):
    """The divergence guard: see :class:`sweeper.run.divergence.DivergenceGuard`."""

    enabled: bool = True
    factor: float = Field(default=4.0, gt=1.0)
    patience: int = Field(default=5, ge=0)
    warmup_steps: int = Field(default=0, ge=0)


class ResourcesSection(_Section):
    devices: Literal["auto", "cpu"] | Annotated[list[int], Field(min_length=1)] = "auto"
    trials_per_device: PositiveInt = Field(default=1, le=256)
    cpu_workers: PositiveInt = 1
    """More than the machine's cores are capped at the cores when slots are planned."""
    trial_timeout: PositiveFloat | None = None


class ValidationSection(_Section):
    """k-fold cross-validation: ``folds = 1`` validates on the val split as it is."""

    folds: int = Field(default=1, ge=1, le=20)


class ConfirmSection(_Section):
    """Confirming the best: after the search, the top configurations run again with new seeds,
    and the best is chosen by the mean over the seeds."""

    top_k: int = Field(default=3, ge=1, le=1000)
    """The best configurations (distinct params, by value) that are run again."""
    seeds: int = Field(default=3, ge=1, le=1000)
    """New seeds each of them runs with; each run is a trial of its own."""


class AuditSection(_Section):
    """The data audit: see :mod:`sweeper.audit`."""

    min_examples_per_class: PositiveInt = 20
    max_metric_step: float = Field(default=0.01, gt=0.0, le=1.0)


class ScheduleSection(_Section):
    """Nightly sweeps: see :mod:`sweeper.nightly.night` and :mod:`sweeper.nightly.schedule`."""

    cron: str | None = None
    timezone: str = "UTC"
    warm_start_top_k: int = Field(default=5, ge=0)
    regression_tolerance: float = Field(default=0.01, ge=0.0)
    notify: str | None = None

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is None:
            return value
        try:
            valid = croniter.is_valid(value)
        except Exception:  # croniter raises several kinds on odd text
            valid = False
        if not valid:
            raise ValueError(f"not a valid cron expression: {shown(value)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"unknown time zone {shown(value)} (an IANA name such as UTC or Europe/Paris)"
            ) from None
        return value

    @field_validator("notify")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is None:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            raise ValueError("not a valid URL") from None
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
            raise ValueError(f"must be an http:// or https:// URL, got {shown(scheme)}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "a user or password in the URL (user:pass@) is never sent; put the token "
                "in the path or query instead, e.g. https://hooks.example.org/<token>"
            )
        return value


class TrackingSection(_Section):
    """Experiment tracking: each trial is a run of TensorBoard, MLflow or W&B.

    See :mod:`sweeper.run.tracking`. Each option belongs to the backends named in
    its description; giving it to another backend is an error.
    """

    backend: Literal["tensorboard", "mlflow", "wandb"]
    """The tracker each trial's run goes to; its package is an extra of sweeper
    (`pip install 'sweeper[mlflow]'`)."""
    dir: str | None = Field(default=None, min_length=1, max_length=1000)
    """tensorboard, wandb: the folder runs are written to, relative to the study file
    (default: `tensorboard/` beside it for TensorBoard, the study file's folder for W&B,
    which writes a `wandb/` folder there)."""
    tracking_uri: str | None = Field(default=None, min_length=1, max_length=2000)
    """mlflow: where runs are stored: `sqlite:///mlflow.db` (a relative path is relative to
    the study file), a server's `http(s)://` URL, or `env:NAME` to read it from an
    environment variable (default: `sqlite:///mlflow.db` beside the study file)."""
    experiment: str | None = Field(default=None, min_length=1, max_length=500)
    """mlflow: the experiment that holds the study's runs (default: the study name)."""
    project: str | None = Field(default=None, min_length=1, max_length=128)
    """wandb: the project that holds the study's runs (default: the study name)."""
    entity: str | None = Field(default=None, min_length=1, max_length=128)
    """wandb: the user or team that owns the project (default: your W&B default)."""
    mode: Literal["offline", "online"] = "offline"
    """wandb: `offline` writes runs to disk only (upload later with `wandb sync`);
    `online` sends them to W&B and needs `WANDB_API_KEY` in the environment."""

    @field_validator(*TRACKING_OPTIONS)
    @classmethod
    def _option_of_backend(cls, value: Any, info: ValidationInfo) -> Any:
        backend = info.data.get("backend")
        owners = TRACKING_OPTIONS[str(info.field_name)]
        if backend is not None and backend not in owners:
            raise ValueError(f"an option of {' and '.join(owners)}, not of {backend}")
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith(FROM_ENV):
            if not _ENV_NAME.fullmatch(value.removeprefix(FROM_ENV)):
                raise ValueError(
                    "env: takes the name of an environment variable (letters, digits and "
                    f"'_', not beginning with a digit), e.g. env:MLFLOW_TRACKING_URI; got "
                    f"{shown(value)}"
                )
        elif not _URI_SCHEME.match(value):
            raise ValueError(
                "a URI with a scheme, such as sqlite:///mlflow.db or https://mlflow.example.org, "
                f"or env:NAME; got {shown(value)}"
            )
        return value

    @field_validator("project", "entity")
    @classmethod
    def _wandb_name(cls, value: str | None) -> str | None:
        if value is not None and _WANDB_FORBIDDEN & set(value):
            raise ValueError(f"W&B names may not contain any of / \\ # ? % :; got {shown(value)}")
        return value


class StudyConfig(_Section):
    """A validated study file. ``path`` is the file it came from."""

    path: Path
    study: StudySection
    task: TaskSection
    trainer: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Any]
    sampler: PluginSection = PluginSection(name="tpe")
    pruner: PluginSection = PluginSection(name="median")
    divergence: DivergenceSection = DivergenceSection()
    resources: ResourcesSection = ResourcesSection()
    schedule: ScheduleSection = ScheduleSection()
    audit: AuditSection = AuditSection()
    validation: ValidationSection = ValidationSection()
    confirm: ConfirmSection | None = None
    tracking: TrackingSection | None = None
    night: dt.date | None = None
    """Set by :meth:`for_night`, never by the study file."""

    def for_night(self, night: dt.date) -> StudyConfig:
        """The study of one night: ``<name>@<date>`` in the same storage, files under nights/."""
        study = self.study.model_copy(
            update={"name": f"{self.study.name}@{night.isoformat()}", "storage": self.storage_url}
        )
        return self.model_copy(update={"study": study, "night": night})

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def storage_url(self) -> str:
        """The storage URL; a relative SQLite path is relative to the study file.

        ``env:NAME`` is read from that environment variable now, so that a password
        need not be in the study file; a missing, empty or unusable value is a ConfigError.
        """
        url = self.study.storage
        if url is None:
            return f"sqlite:///{self.folder / self.study.name}.db"
        if url.startswith(FROM_ENV):
            url = _storage_from_environment(self.path, url.removeprefix(FROM_ENV))
        from sweeper.store.open import relative_to

        return relative_to(url, self.folder)

    @property
    def base_name(self) -> str:
        """The study name of the file, without a night's date."""
        return self.study.name if self.night is None else self.study.name.rsplit("@", 1)[0]

    @property
    def output_dir(self) -> Path:
        """Where the study's files (best.toml, report.html) go; a night's under nights/."""
        if self.night is None:
            return self.folder / self.study.name
        return self.folder / self.base_name / "nights" / self.night.isoformat()


def load_config(path: str | Path, *, n_trials: int | None = None) -> StudyConfig:
    """Read and validate a study file; ``n_trials`` overrides ``[study] n_trials``."""
    path = Path(path).resolve()
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a study file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the study file: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES // 2**20} MiB; not a study file")
    text = utf8_text(data, path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except ValueError:  # int() refuses integers of more than 4300 digits
        raise ConfigError(f"{path}: invalid TOML: a number too long to read") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    if n_trials is not None:
        if n_trials < 1:
            raise ConfigError(f"--n-trials must be at least 1, got {n_trials}")
        if isinstance(raw.setdefault("study", {}), dict):  # else validation says what is wrong
            raw["study"]["n_trials"] = n_trials
    return parse_config(raw, path)


def parse_config(raw: Mapping[str, Any], path: Path) -> StudyConfig:
    """Validate an already-parsed study file, including its search space and plugins."""
    from sweeper.space import parse_space  # space imports optuna; keep it local

    for internal in INTERNAL:
        if internal in raw:
            raise ConfigError(f"{path}: {_unknown(internal, StudyConfig)}")
    _check_numbers(path, raw, "")
    try:
        config = StudyConfig.model_validate({**raw, "path": path})
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc)) from None
    parse_space(config.search, path)
    _check_plugin(path, "sampler", config.sampler.name, SAMPLERS)
    _check_plugin(path, "pruner", config.pruner.name, PRUNERS)
    if config.sampler.name == "grid":
        from sweeper.space import grid_space

        grid_space(config.search, path)
    if config.study.multi_objective:
        _check_several_objectives(config)
    return config


SINGLE_OBJECTIVE = {
    ("sampler", "cmaes"): "CMA-ES optimizes one metric",
    ("pruner", "hyperband"): "Hyperband's brackets rank trials by one metric's value",
}
"""Plugins that cannot serve a study of several objectives, and why."""


def _check_several_objectives(config: StudyConfig) -> None:
    """Refuse what a study of several metrics cannot do, naming the key."""
    several = f"study.metric lists {len(config.study.metrics)} metrics"
    for section in ("sampler", "pruner"):
        name = getattr(config, section).name
        why = SINGLE_OBJECTIVE.get((section, name))
        if why is not None:
            others = [
                known
                for known in (SAMPLERS if section == "sampler" else PRUNERS)
                if (section, known) not in SINGLE_OBJECTIVE
            ]
            raise ConfigError(
                f"{config.path}: {section}.name: {name} cannot serve a study of several "
                f"objectives ({several}; {why}); choose one of {', '.join(others)}"
            )
    if config.confirm is not None:
        raise ConfigError(
            f"{config.path}: confirm: [confirm] chooses one best configuration by its mean, and "
            f"{several}, which have a Pareto front instead; remove [confirm] or study one metric"
        )


def utf8_text(data: bytes, path: Path, error: type[SweeperError] = ConfigError) -> str:
    """A file's bytes as text, or ``error`` naming the file, line and first byte not UTF-8.

    A byte-order mark, as some editors write, is dropped.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{path}: not UTF-8 text (byte {exc.start}, line {line}: "
            f"{data[exc.start : exc.start + 1]!r}); save it as UTF-8"
        ) from None


def shown(value: Any, width: int = 60) -> str:
    """``repr(value)``, shortened to about ``width`` characters for a one-line message."""
    text = repr(value)
    if len(text) <= width:
        return text
    return f"{text[: width - 1]}… ({len(text)} characters)"


def _check_storage(url: str) -> None:
    """Refuse a storage URL SQLAlchemy cannot parse, of an unknown database, or in memory.

    ``env:NAME`` needs a valid variable name here; the variable's value is checked when
    it is read (:attr:`StudyConfig.storage_url`), on the machine that uses it.
    """
    from sweeper.store.open import usable_url

    if url.startswith(FROM_ENV):
        if not _ENV_NAME.fullmatch(url.removeprefix(FROM_ENV)):
            raise ValueError(
                "env: takes the name of an environment variable (letters, digits and '_', "
                f"not beginning with a digit), e.g. env:SWEEPER_STORAGE; got {shown(url)}"
            )
        return
    usable_url(url)


def environment_value(path: Path, key: str, name: str, what: str, example: str) -> str:
    """Environment variable ``name``, stripped, that ``key`` names with ``env:``.

    Unset or empty is a ConfigError saying what to set it to. Messages never
    show the value: it may hold a password.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        state = "is empty" if name in os.environ else "is not set"
        raise ConfigError(
            f"{path}: {key}: environment variable {name} {state}; set it to {what}, "
            f"e.g. {name}={example}"
        )
    return value


def _storage_from_environment(path: Path, name: str) -> str:
    """The storage URL in environment variable ``name``, checked as a literal one is.

    Surrounding whitespace is dropped (a secret read from a file often ends in a newline).
    Messages never show the value: it holds the password.
    """
    from sweeper.store.open import usable_url

    value = environment_value(
        path,
        "study.storage",
        name,
        f'the storage URL (storage = "{FROM_ENV}{name}")',
        "postgresql://user:password@db-host:5432/sweeps",
    )
    try:
        usable_url(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: study.storage: environment variable {name}: {exc}") from None
    return value


def _check_numbers(path: Path, raw: Any, key: str) -> None:
    """Refuse integers beyond ±2**53 anywhere in the file, naming the key."""
    if isinstance(raw, Mapping):
        for name, value in raw.items():
            _check_numbers(path, value, f"{key}.{name}" if key else str(name))
    elif isinstance(raw, list):
        for item in raw:
            _check_numbers(path, item, key)
    elif isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) > LARGEST:
        raise ConfigError(
            f"{path}: {key}: {shown(raw, 40)} is out of range; numbers in a study file stay "
            "within ±2**53"
        )


def _check_plugin(path: Path, section: str, name: str, known: Sequence[str]) -> None:
    if name not in known:
        raise ConfigError(
            f"{path}: {section}.name: unknown {section} {shown(name)}"
            f"{_did_you_mean(name, known)}; choose one of {', '.join(known)}"
        )


def _describe(path: Path, exc: ValidationError) -> str:
    """One line naming every problem pydantic found, each by its key path.

    Unknown keys come first, with a did-you-mean (a mistyped key also makes
    the key it was meant to be missing); one problem per key.
    """
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    problems: dict[str, str] = {}
    for error in errors:
        key, problem = _problem(error)
        problems.setdefault(key, problem)
    return f"{path}: " + "; also ".join(problems.values())


def _problem(error: Any) -> tuple[str, str]:
    """The key path of one pydantic error and what to say about it."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        return key, _unknown(key, model)
    if error["type"] == "missing":
        return key, f"{key}: required key is missing"
    if error["type"] == "value_error":
        return key, f"{key}: {error['ctx']['error']}"
    # Unions report one error per branch; the first branch's message is enough.
    if loc and loc[-1] in {"literal['auto','cpu']", "list[int]"}:
        key = ".".join(loc[:-1])
    if loc[:2] == ["study", "metric"] or loc[:2] == ["study", "direction"]:
        return ".".join(loc[:2]), f"{'.'.join(loc[:2])}: {_OBJECTIVE[loc[1]]} (got " + (
            f"{shown(error.get('input'))})"
        )
    if loc and loc[0] == "resources" and len(loc) >= 2 and loc[1] == "devices":
        return "resources.devices", (
            'resources.devices: must be "auto", "cpu" or a non-empty list of GPU indices'
        )
    value = error.get("input")
    got = f" (got {shown(value)})" if not isinstance(value, dict) else ""
    return key, f"{key}: {error['msg']}{got}"


_OBJECTIVE = {
    "metric": f"a metric's name, or a list of 1 to {MAX_OBJECTIVES} distinct names for several "
    "objectives",
    "direction": '"maximize" or "minimize", or a list of them, one per metric',
}


def _model_at(loc: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = StudyConfig
    for part in loc:
        annotation = model.model_fields[part].annotation
        for candidate in typing.get_args(annotation) or (annotation,):  # X | None: X
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
    return model


def _unknown(key: str, model: type[BaseModel]) -> str:
    name = key.rsplit(".", 1)[-1]
    known = [field for field in model.model_fields if field not in INTERNAL]
    return f"{key}: unknown key{_did_you_mean(name, known)}"


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
