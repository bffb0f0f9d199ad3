"""``study.toml`` to a typed, frozen config; the only module that reads TOML."""

from __future__ import annotations

import datetime as dt
import difflib
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from sweeper.errors import ConfigError

SAMPLERS = ("tpe", "random", "gp", "cmaes", "qmc", "grid")
INTERNAL = ("path", "night")
"""StudyConfig fields that are not keys of the study file."""
PRUNERS = ("median", "percentile", "hyperband", "asha", "threshold", "none")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudySection(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
    direction: Literal["maximize", "minimize"]
    metric: str = Field(min_length=1)
    n_trials: PositiveInt
    seed: int = 0
    storage: str | None = None
    keep_weights: int = Field(default=1, ge=0)
    max_failures: PositiveInt = 10


class TaskSection(BaseModel):
    """``name`` picks the task; every other key is an option of that task."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PluginSection(BaseModel):
    """A sampler or pruner: ``name`` plus constructor options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

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
    devices: Literal["auto", "cpu"] | list[int] = "auto"
    trials_per_device: PositiveInt = 1
    cpu_workers: PositiveInt = 1
    trial_timeout: PositiveFloat | None = None


class ValidationSection(_Section):
    """k-fold cross-validation: ``folds = 1`` validates on the val split as it is."""

    folds: int = Field(default=1, ge=1, le=20)


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

        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a valid cron expression: {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Paris)"
            ) from None
        return value

    @field_validator("notify")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
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
        """The storage URL; a relative SQLite path is relative to the study file."""
        url = self.study.storage
        if url is None:
            return f"sqlite:///{self.folder / self.study.name}.db"
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
            return f"{prefix}{(self.folder / url[len(prefix) :]).resolve()}"
        return url

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
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a study file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if n_trials is not None:
        if n_trials < 1:
            raise ConfigError(f"--n-trials must be at least 1, got {n_trials}")
        raw.setdefault("study", {})["n_trials"] = n_trials
    return parse_config(raw, path)


def parse_config(raw: Mapping[str, Any], path: Path) -> StudyConfig:
    """Validate an already-parsed study file, including its search space and plugins."""
    from sweeper.space import parse_space  # space imports optuna; keep it local

    for internal in INTERNAL:
        if internal in raw:
            raise ConfigError(_unknown(path, internal, StudyConfig))
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
    return config


def _check_plugin(path: Path, section: str, name: str, known: Sequence[str]) -> None:
    if name not in known:
        raise ConfigError(
            f"{path}: {section}.name: unknown {section} {name!r}{_did_you_mean(name, known)}; "
            f"choose one of {', '.join(known)}"
        )


def _describe(path: Path, exc: ValidationError) -> str:
    """One line for the first problem pydantic found, naming the key path."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        return _unknown(path, key, model)
    if error["type"] == "missing":
        return f"{path}: {key}: required key is missing"
    if error["type"] == "value_error":
        return f"{path}: {key}: {error['ctx']['error']}"
    # Unions report one error per branch; the first branch's message is enough.
    if loc and loc[-1] in {"literal['auto','cpu']", "list[int]"}:
        key = ".".join(loc[:-1])
    if loc and loc[0] == "resources" and len(loc) >= 2 and loc[1] == "devices":
        return f'{path}: resources.devices: must be "auto", "cpu" or a list of GPU indices'
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"{path}: {key}: {error['msg']}{shown}"


def _model_at(loc: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = StudyConfig
    for part in loc:
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def _unknown(path: Path, key: str, model: type[BaseModel]) -> str:
    name = key.rsplit(".", 1)[-1]
    known = [field for field in model.model_fields if field not in INTERNAL]
    return f"{path}: {key}: unknown key{_did_you_mean(name, known)}"


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
