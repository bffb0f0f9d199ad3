"""Keep the weights of the top-k trials (at their best validation); delete the rest.

Files live in ``<folder>/<name>/weights/``: ``trial-<n>.pt`` (a state dict;
of a LoRA trial, its adapters and head only) and ``index.json`` (trial number
to value), both changed only under a file lock in that folder, so trials
finishing at once on several workers keep exactly the best k, whatever
order they are told to the study in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sweeper.atomic import replacing, write_text
from sweeper.config import StudyConfig


def weights_dir(config: StudyConfig) -> Path:
    return config.output_dir / "weights"


def keep(config: StudyConfig, number: int, value: float, state: dict[str, Any]) -> Path | None:
    """Save this trial's weights if it ranks in the top ``keep_weights``; prune the others.

    Returns the file it was saved to, or None when it did not make the cut.
    """
    import torch
    from filelock import FileLock

    k = config.study.keep_weights
    if k == 0:
        return None
    if config.confirm is not None:  # the chosen best is one of the top_k, by mean
        k = max(k, config.confirm.top_k)
    folder = weights_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / "index.lock"):
        index_file = folder / "index.json"
        index = {int(n): v for n, v in _read(index_file).items()}
        index[number] = value
        maximize = config.study.maximize
        ranked = sorted(index.items(), key=lambda item: item[1], reverse=maximize)[:k]
        kept = dict(ranked)
        path = folder / f"trial-{number}.pt"
        if number in kept:
            with replacing(path, "wb") as file:
                torch.save(adapter_and_head(state), file)
        _write(index_file, kept)
        for stale in folder.glob("trial-*.pt"):
            if int(stale.stem.removeprefix("trial-")) not in kept:
                stale.unlink(missing_ok=True)
    return path if number in kept else None


def adapter_and_head(state: dict[str, Any]) -> dict[str, Any]:
    """Of a LoRA (peft) model, only the adapters and the trained head; anything else whole.

    The frozen base is the model the trial started from, so it is not kept again.
    """
    if not any(_ADAPTER in name for name in state):
        return state
    return {n: t for n, t in state.items() if _ADAPTER in n or _HEAD in n}


_ADAPTER = ".lora_"
_HEAD = ".modules_to_save."


def load_hint(params: dict[str, Any]) -> str | None:
    """How to load a trial's kept weights, for best.toml, when it is not a whole state dict."""
    if not int(params.get("lora_r") or 0) > 0:
        return None
    return (
        "peft adapter + head: module, _ = sweeper.tasks.load_task(load_config(study_file))"
        "(params); module.load_state_dict(torch.load(weights), strict=False)"
    )


def _read(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, index: dict[int, float]) -> None:
    write_text(path, json.dumps({str(n): v for n, v in index.items()}, indent=1))
