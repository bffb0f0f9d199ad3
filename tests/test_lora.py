"""LoRA in the built-in text task, and the parameter counts every trial records."""

from __future__ import annotations

import tomllib
from pathlib import Path

import optuna
import pytest
import torch
from torchmetrics.classification import MulticlassF1Score

from sweeper.config import load_config
from sweeper.run.weights import load_hint
from sweeper.tasks import load_task
from tests.conftest import StudyDir, run_sweeper, study
from tests.test_text_task import build, fit, refused_for_real, text_study, tiny_bert


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


LORA = {"lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3, "batch_size": 16}


def base_weights(module) -> dict[str, torch.Tensor]:
    """The tensors peft left frozen: everything but the adapters and the trained head."""
    return {
        name: tensor.detach().clone()
        for name, tensor in module.state_dict().items()
        if ".lora_" not in name and ".modules_to_save." not in name
    }


def test_lora_trains_the_adapters_and_the_head_only(study_dir: StudyDir, model_dir: Path) -> None:
    module, data = build(study_dir, model_dir, LORA)
    before = base_weights(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any("attention.self.query.lora_A" in n for n in trainable)
    assert not any("intermediate" in n for n in trainable), "attention: no MLP adapters"
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    fit(module, data, epochs=2)
    moved = {
        n for n, p in module.named_parameters() if n in trained and not torch.equal(p, trained[n])
    }
    assert any(".lora_B." in n for n in moved) and any(".modules_to_save." in n for n in moved)
    after = base_weights(module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "the base encoder changed"


def test_all_linear_freeze_layers_and_layer_decay_with_lora(
    study_dir: StudyDir, model_dir: Path
) -> None:
    params = {**LORA, "lora_target": "all-linear", "freeze_layers": 1, "layer_lr_decay": 0.5}
    module, _data = build(study_dir, model_dir, params)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any("intermediate.dense.lora_A" in n for n in trainable)
    assert not any(".layer.0." in n for n in trainable), "freeze_layers=1: layer 0 untrained"
    assert any(".layer.1." in n for n in trainable)
    rates = sorted({group["lr"] for group in module.parameter_groups()})
    assert rates == [5e-3 * 0.5, 5e-3], "layer 1's adapters decayed once, the head at lr"


def test_sweep_with_and_without_lora(study_dir: StudyDir, model_dir: Path) -> None:
    data = text_study(study_dir.root, model_dir, search={**LORA, "lora_r": {"choices": [0, 4]}})
    data["study"].update(keep_weights=2)
    data["sampler"] = {"name": "grid"}
    path = study_dir.write(data)
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    storage = f"sqlite:///{study_dir.root / 'text.db'}"
    trials = optuna.load_study(study_name="text", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    by_r = {t.params["lora_r"]: t for t in trials}
    full, lora = by_r[0], by_r[4]
    assert full.user_attrs["total_params"] == full.user_attrs["trainable_params"]
    assert lora.user_attrs["trainable_params"] * 5 < full.user_attrs["trainable_params"]
    assert lora.user_attrs["total_params"] > full.user_attrs["total_params"]  # + adapters

    kept_full = torch.load(full.user_attrs["weights"])
    kept_lora = torch.load(lora.user_attrs["weights"])
    assert all(".lora_" in n or ".modules_to_save." in n for n in kept_lora)
    assert any(".lora_B." in n for n in kept_lora) and any("classifier" in n for n in kept_lora)
    size = Path(lora.user_attrs["weights"]).stat().st_size
    assert size * 5 < Path(full.user_attrs["weights"]).stat().st_size
    assert len(kept_full) > len(kept_lora)

    # the adapters and head, loaded into a fresh model, predict as at the trial's best validation
    params = {**LORA, "lora_r": 4}
    module, datamodule = load_task(load_config(path))(params)
    missing, unexpected = module.load_state_dict(kept_lora, strict=False)
    assert not unexpected and not any(".lora_" in n for n in missing)
    module.eval()
    f1 = MulticlassF1Score(2, average="macro")
    with torch.no_grad():
        for input_ids, attention_mask, labels in datamodule.val_dataloader():
            f1.update(module(input_ids, attention_mask), labels)
    at_best = next(
        r for r in lora.user_attrs["history"] if r["step"] == lora.user_attrs["best_step"]
    )
    assert float(f1.compute()) == pytest.approx(at_best["val_f1"], abs=1e-6)

    best = tomllib.loads((study_dir.root / "text" / "best.toml").read_text())["best"]
    is_lora = best["weights"] == lora.user_attrs["weights"]
    assert ("load" in best) == is_lora
    if is_lora:
        assert best["load"].startswith("peft adapter + head: ")


def test_load_hint_only_for_lora() -> None:
    assert load_hint({"lora_r": 0}) is None and load_hint({"lr": 0.1}) is None
    assert (load_hint({"lora_r": 8}) or "").startswith("peft adapter + head: ")


def test_every_task_records_its_parameter_counts(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 1}, resources={"cpu_workers": 1}))
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trial = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials[0]
    assert 0 < trial.user_attrs["trainable_params"] <= trial.user_attrs["total_params"]


BAD_LORA = {
    "negative rank": ({"lora_r": -1}, "search.lora_r: Input should be greater than or equal to 0"),
    "fractional rank choice": (
        {"lora_r": {"choices": [0, 4.5]}},
        "search.lora_r.choices: Input should be a valid integer (got 4.5)",
    ),
    "alpha of zero": (
        {"lora_alpha": {"low": 0, "high": 32}},
        "search.lora_alpha.low: Input should be greater than or equal to 1 (got 0)",
    ),
    "dropout of one": (
        {"lora_dropout": 1.0},
        "search.lora_dropout: Input should be less than 1 (got 1.0)",
    ),
    "unknown target": (
        {"lora_target": {"choices": ["attention", "mlp"]}},
        "search.lora_target.choices: Input should be 'attention' or 'all-linear' (got 'mlp')",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LORA))
def test_bad_lora_values_are_refused_before_trials_run(
    study_dir: StudyDir, model_dir: Path, case: str
) -> None:
    search, fragment = BAD_LORA[case]
    data = text_study(
        study_dir.root, model_dir, search={"learning_rate": {"low": 1e-4, "high": 1e-3}, **search}
    )
    path = study_dir.write(data)
    refused_for_real(study_dir, path, f"{path}: ", fragment)
