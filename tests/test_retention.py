"""Model artifact retention: wandb.model_artifacts (every_best, final_best, off), training.save_model_as_artifact
as the switch over it, and wandb.artifact_ttl_days, read back from a real offline run's records."""

from __future__ import annotations

import json

import pytest

from loop.config import load_config
from loop.errors import UserError
from loop.tracking import model_artifact_due
from loop.wandb_offline import find_offline_runs, read_offline_run


@pytest.mark.parametrize(("overrides", "at_new_best", "at_end"), [
    ([], True, False),
    (["wandb.model_artifacts=final_best"], False, True),
    (["wandb.model_artifacts=off"], False, False),
    # save_model_as_artifact = false wins over whatever model_artifacts says.
    (["wandb.model_artifacts=every_best", "training.save_model_as_artifact=false"], False, False),
    (["wandb.model_artifacts=final_best", "training.save_model_as_artifact=false"], False, False),
])
def test_when_the_best_model_is_uploaded(overrides, at_new_best, at_end):
    cfg = load_config(None, overrides)
    assert (model_artifact_due(cfg, at_end=False), model_artifact_due(cfg, at_end=True)) == (at_new_best, at_end)


@pytest.mark.parametrize(("overrides", "message"), [
    (["wandb.model_artifacts=all"], "`wandb.model_artifacts` must be one of 'every_best', 'final_best', 'off'"),
    (["wandb.artifact_ttl_days=-1"], "`wandb.artifact_ttl_days` must be"),
    (["wandb.registry_collection=my models"], "`wandb.registry_collection` must be only letters, digits"),
    (["wandb.registry_collection=kobart", "wandb.model_artifacts=off"],
     "`wandb.registry_collection` links the final best model artifact, but none is logged"),
    (["wandb.registry_collection=kobart", "training.save_model_as_artifact=false"],
     "`wandb.registry_collection` links the final best model artifact, but none is logged"),
])
def test_bad_retention_settings_are_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def model_artifacts(out):
    run = read_offline_run(find_offline_runs(out)[0])
    return [a for a in run.artifacts if a["type"] == "model"]


def test_final_best_uploads_only_the_final_best_once(final_best_run):
    out = final_best_run["out"]
    evals = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    improvements = [row["step"] for i, row in enumerate(evals)
                    if all(row["rouge_l"] > earlier["rouge_l"] for earlier in evals[:i])]
    assert len(improvements) >= 2, evals  # several new bests, so every_best would have uploaded several
    final = json.loads((out / "best/metrics.json").read_text())["step"]
    assert final == improvements[-1]
    [art] = model_artifacts(out)
    assert art["name"] == f"model-{read_offline_run(find_offline_runs(out)[0]).id}"
    assert set(art["aliases"]) == {"best", f"step-{final}", "latest"} and art["metadata"]["step"] == final
    assert set(art["manifest"]) >= {"model.safetensors", "config.json", "tokenizer_config.json", "metrics.json"}
    # No snapshot of an earlier best was made, and the recorded files are the final best's.
    assert [p.name for p in (out / "artifacts").iterdir()] == [f"best-step_{final}"]
    assert {e["local_path"] for e in art["manifest"].values()} == {
        str((out / "artifacts" / f"best-step_{final}" / name).resolve()) for name in art["manifest"]}


def test_the_ttl_is_recorded_on_the_offline_artifact(final_best_run):
    [art] = model_artifacts(final_best_run["out"])
    assert art["ttl_s"] == 7 * 24 * 3600
