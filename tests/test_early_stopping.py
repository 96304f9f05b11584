"""Early stopping: after `early_stopping_patience` evals without an improvement above the threshold the run ends
the normal way (final save, final metrics, the final line says why), and the patience survives `--resume`."""

from __future__ import annotations

import json

import pytest

from loop.state import TrainState
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import run_train

# The eval loss improves by far less than 10 per eval, so with threshold 10 no eval after the first counts as an
# improvement: evals at steps 0, 2, 4 -> the patience of 2 runs out at step 4, whatever the tiny model learns.
EARLY = ["training.max_steps=12", "evaluation.eval_steps=2", "evaluation.save_steps=100", "wandb.table_rows=0",
         "evaluation.metric_for_best_model=loss", "evaluation.greater_is_better=false",
         "evaluation.early_stopping_patience=2", "evaluation.early_stopping_threshold=10", "training.output_dir=out"]
LINE = "done: stopped early at step 4 of 12 (no eval/loss improvement above 10 in 2 evals); best eval/loss = "


@pytest.mark.parametrize(("greater", "values", "counts"), [
    (True, [0.5, 0.52, 0.52, 0.6, 0.59], [0, 1, 2, 0, 1]),   # threshold 0.05: +0.02 is not enough, +0.1 is
    (False, [2.0, 1.99, 1.9, 1.95], [0, 1, 0, 1]),
])
def test_patience_counts_evals_without_an_improvement_above_the_threshold(greater, values, counts):
    state, seen = TrainState(), []
    for value in values:
        state.note_eval(value, greater, 0.05)
        if state.improves(value, greater):
            state.best_metric = value
        seen.append(state.evals_without_improvement)
    assert seen == counts


def test_a_run_out_of_patience_ends_the_normal_way(tmp_path):
    proc = run_train(tmp_path, *EARLY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(LINE)
    final = json.loads((tmp_path / "out/final_metrics.json").read_text())
    assert final["step"] == 4 and final["early_stopped"]["step"] == 4
    assert (tmp_path / "out/checkpoints/step_4/manifest.json").exists()  # the final save
    run = read_offline_run(find_offline_runs(tmp_path / "out")[0])
    assert history_series(run, "final/early_stopped_at_step") == [(4, 4.0)]
    assert [s for s, _ in history_series(run, "final/loss")] == [4]


def test_patience_survives_a_resume_and_the_run_ends_at_the_same_step(tmp_path):
    first = run_train(tmp_path, *EARLY, extra_env={"LOOP_FAULT_PREEMPT_AT_MICROSTEP": "3"})
    assert first.returncode == 0 and "at step 3; checkpoint saved" in first.stdout, first.stderr[-3000:]
    state = json.loads((tmp_path / "out/checkpoints/step_3/trainer_state.json").read_text())
    assert state["evals_without_improvement"] == 1  # the eval at step 2 did not count
    second = run_train(tmp_path, *EARLY, extra_args=("--resume", "auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip().splitlines()[-1].startswith(LINE)
    again = run_train(tmp_path, *EARLY, extra_args=("--resume", "auto"))  # nothing left to train
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from out/checkpoints/step_4 at step 4" in again.stdout
    assert again.stdout.strip().splitlines()[-1].startswith(LINE)


def test_a_trainer_state_written_before_early_stopping_existed_still_reads():
    old = TrainState(step=7).to_dict()
    del old["evals_without_improvement"]  # what checkpoints written before the counter hold
    state = TrainState.from_dict(json.loads(json.dumps(old)))
    assert state.step == 7 and state.evals_without_improvement == 0
    with pytest.raises(ValueError, match="no `step`"):  # a field every checkpoint has is still required
        TrainState.from_dict({k: v for k, v in old.items() if k != "step"})
