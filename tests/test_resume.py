"""Resuming a training: the same steps, losses and weights as a run that was never stopped.

On CPU the comparison is bitwise: the checkpoint restores every tensor and RNG state exactly,
and the same thread count gives the same reductions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import make_plan
from dpr_hpc.resume.signals import TrainingInterrupted
from dpr_hpc.resume.checkpoints import CheckpointStore
from conftest import GRID, StopAfter, run_folder as _run_folder, train_attempt, train_folder, train_in_process as _train, write_grid


def _weights(layout: RunLayout, cell_id: str) -> dict[str, torch.Tensor]:
    from dpr_hpc.modeling.encoder import DprEncoder

    weights = {}
    for tower, folder in (("q", train_attempt(layout, cell_id).question_encoder), ("p", train_attempt(layout, cell_id).passage_encoder)):
        state = DprEncoder.from_pretrained(str(folder), 48).state_dict()
        weights.update({f"{tower}.{k}": v for k, v in state.items()})
    return weights


def _losses(layout: RunLayout, cell_id: str) -> list[float]:
    return json.loads(train_attempt(layout, cell_id).losses.read_text())["step_losses"]


def _assert_same_training(a: tuple[RunLayout, str], b: tuple[RunLayout, str]) -> None:
    assert _losses(*a) == _losses(*b)  # every step's loss, bitwise
    wa, wb = _weights(*a), _weights(*b)
    assert wa.keys() == wb.keys() and any(k.startswith("q.projection") for k in wa)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(demo_assets, tmp_path_factory):
    layout, cell_id = _run_folder(tmp_path_factory.mktemp("plain"), demo_assets, "plain")
    output = _train(layout, cell_id)
    assert output.details["restarts"] == 0 and len(output.details["segments"]) == 1
    return layout, cell_id


def test_training_stopped_twice_resumes_to_the_same_losses_and_weights(uninterrupted, demo_assets, tmp_path):
    layout, cell_id = _run_folder(tmp_path, demo_assets, "stopped")
    with pytest.raises(TrainingInterrupted) as first:
        _train(layout, cell_id, StopAfter(10))  # mid-epoch 1 (24 steps an epoch)
    assert first.value.step == 10
    with pytest.raises(TrainingInterrupted) as second:
        _train(layout, cell_id, StopAfter(31))  # mid-epoch 2
    assert second.value.step == 41
    output = _train(layout, cell_id)

    _assert_same_training(uninterrupted, (layout, cell_id))
    segments = output.details["segments"]
    assert [s["steps"] for s in segments] == [10, 31, 31]
    assert [s["first_step"] for s in segments] == [0, 10, 41]
    assert [s["ended_by"] for s in segments] == ["test stop", "test stop", "finished"]
    assert output.details["restarts"] == 2
    assert output.timings["ttt_s"] == pytest.approx(sum(s["train_s"] for s in segments), abs=1e-9)
    assert output.metrics["epoch_loss"] == json.loads(train_attempt(layout, cell_id).losses.read_text())["epoch_losses"]


def test_shuffled_hard_negatives_resume_bitwise_and_change_the_training(uninterrupted, demo_assets, tmp_path):
    """`hard_negative: shuffle` draws each epoch's negatives from the seed and the epoch, so a
    run stopped mid-epoch 2 ends with the same losses and weights as one never stopped; and
    the negatives it trains with are not the first ones (its losses differ from `first`'s)."""
    shuffle = "    train: {hard_negative: shuffle}\n"
    plain = _run_folder(tmp_path, demo_assets, "shuffle-plain", extra=shuffle)
    _train(*plain)
    stopped = _run_folder(tmp_path, demo_assets, "shuffle-stopped", extra=shuffle)
    with pytest.raises(TrainingInterrupted):
        _train(*stopped, StopAfter(30))  # mid-epoch 2 (24 steps an epoch)
    output = _train(*stopped)
    assert output.details["hard_negative"] == "shuffle" and output.details["restarts"] == 1
    _assert_same_training(plain, stopped)
    assert _losses(*plain)[24:] != _losses(*uninterrupted)[24:]


def test_corrupted_latest_checkpoint_is_skipped_with_a_warning_and_the_previous_one_used(uninterrupted, demo_assets, tmp_path, capsys):
    layout, cell_id = _run_folder(tmp_path, demo_assets, "corrupt", every=8)
    with pytest.raises(TrainingInterrupted):
        _train(layout, cell_id, StopAfter(20))  # checkpoints at steps 8, 16 and (the stop) 20
    resume = train_attempt(layout, cell_id).resume
    newest = resume / "step-000000020.pt"
    assert sorted(p.name for p in resume.glob("*.pt")) == ["step-000000016.pt", "step-000000020.pt"]
    with newest.open("r+b") as handle:  # flip one byte in the middle
        handle.seek(newest.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    output = _train(layout, cell_id)
    out = capsys.readouterr().out
    assert "step-000000020.pt skipped: checksum mismatch" in out
    assert "resuming from step-000000016.pt" in out
    _assert_same_training(uninterrupted, (layout, cell_id))
    # The step-16 checkpoint knew of 16 steps: steps 17-20 were lost with the corrupted file.
    assert [s["steps"] for s in output.details["segments"]] == [16, 56]
    assert output.details["segments"][0]["ended_by"] == "killed after its last checkpoint"


def test_a_full_disk_during_a_periodic_checkpoint_warns_and_the_training_ends_as_if_nothing_happened(uninterrupted, demo_assets, tmp_path, monkeypatch, capsys):
    layout, cell_id = _run_folder(tmp_path, demo_assets, "enospc", every=8)
    monkeypatch.setenv("DPR_HPC_FAULT", "enospc-during-write:2")  # the step-16 checkpoint
    output = _train(layout, cell_id)
    out = capsys.readouterr().out
    assert "warning: periodic checkpoint at step 16 not written ([Errno 28] No space left on device" in out
    assert "training goes on" in out
    _assert_same_training(uninterrupted, (layout, cell_id))
    assert output.details["restarts"] == 0


def test_a_full_disk_at_the_stop_signal_fails_the_stage_saying_so(demo_assets, tmp_path, monkeypatch):
    from dpr_hpc.errors import CheckpointWriteError

    layout, cell_id = _run_folder(tmp_path, demo_assets, "enospc-stop")
    monkeypatch.setenv("DPR_HPC_FAULT", "enospc-during-write:1")
    with pytest.raises(CheckpointWriteError, match=r"checkpoint at the stop signal \(test stop, step 3\) was not written: .*No space left"):
        _train(layout, cell_id, StopAfter(3))
    resume = train_attempt(layout, cell_id).resume
    assert list(resume.iterdir()) == []  # the partial file is gone


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_orphans_are_pruned(tmp_path, monkeypatch):
    warnings: list[str] = []
    store = CheckpointStore(tmp_path / "resume", warn=warnings.append)
    store.save(1, {"tensor": torch.arange(10)})
    monkeypatch.setenv("DPR_HPC_FAULT", "enospc-during-write:2")
    with pytest.raises(OSError, match="No space left"):
        store.save(2, {"tensor": torch.arange(10) * 2})
    assert sorted(p.name for p in store.folder.iterdir()) == ["step-000000001.json", "step-000000001.pt"]
    assert store.load_latest().step == 1
    monkeypatch.delenv("DPR_HPC_FAULT")
    (store.folder / "step-000000002.pt").write_bytes(b"an orphan: its sidecar never came")
    (store.folder / "step-000000000.json").write_text("{}")  # a sidecar without its checkpoint
    store.save(3, {"tensor": torch.arange(10) * 3})
    assert sorted(p.name for p in store.folder.iterdir()) == ["step-000000001.json", "step-000000001.pt", "step-000000003.json", "step-000000003.pt"]
    assert [w for w in warnings if "removed" in w] == ["warning: checkpoint step-000000002.pt removed: no checksum file (its write never finished)"]
    store.save(4, {"tensor": torch.arange(10) * 4})  # prunes step 1 with its sidecar: no warning
    assert sorted(p.name for p in store.folder.glob("*.pt")) == ["step-000000003.pt", "step-000000004.pt"]
    assert len([w for w in warnings if "removed" in w]) == 1


def test_pruning_leaves_the_temporary_file_another_writer_is_writing(tmp_path):
    """A copy that lost its claim without knowing it yet may prune while the claim's new holder
    writes; it removes only temporary files of its own, whatever their process ids."""
    store = CheckpointStore(tmp_path / "resume")
    store.save(1, {"step": 1})
    theirs = store.folder / f".step-000000002.pt.{os.getpid() + 1}.tmp"  # another process (another host, maybe our pid)
    same_pid = store.folder / f".step-000000002.pt.{os.getpid()}.tmp"
    for file in (theirs, same_pid):
        file.write_bytes(b"half of a checkpoint")
    store.save(2, {"step": 2})
    assert theirs.exists() and same_pid.exists()
    assert sorted(p.name for p in store.folder.glob("step-*.pt")) == ["step-000000001.pt", "step-000000002.pt"]


def test_store_skips_truncated_and_unfinished_checkpoints(tmp_path):
    warnings: list[str] = []
    store = CheckpointStore(tmp_path / "resume", warn=warnings.append)
    assert store.load_latest() is None
    for step in (1, 2, 3):
        store.save(step, {"step": step, "tensor": torch.arange(1000) * step})
    assert sorted(p.name for p in store.folder.glob("*.pt")) == ["step-000000002.pt", "step-000000003.pt"]

    newest = store.folder / "step-000000003.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    loaded = store.load_latest()
    assert loaded.step == 2 and torch.equal(loaded.state["tensor"], torch.arange(1000) * 2)
    assert "truncated" in warnings[-1]

    unfinished = CheckpointStore(tmp_path / "unfinished", warn=warnings.append)
    unfinished.save(1, {"step": 1})
    unfinished.save(2, {"step": 2})
    (unfinished.folder / "step-000000002.json").unlink()  # the .pt was renamed, the sidecar never came
    assert unfinished.load_latest().step == 1
    assert "no checksum file" in warnings[-1]


def test_kill_during_a_checkpoint_write_then_resubmit_resumes_from_the_previous_one(uninterrupted, demo_assets, tmp_path):
    """A real SIGKILL halfway through writing the 2nd checkpoint (step 16), in a job the local
    backend runs; the resubmit resumes from step 8 and ends where the uninterrupted run ends."""
    grid_file = write_grid(tmp_path, GRID.format(name="killed", demo=demo_assets, every=8), "killed.yaml")
    env = {**os.environ, "DPR_HPC_FAULT": "kill-during-write:2"}
    command = [sys.executable, "-m", "dpr_hpc", "submit", str(grid_file), "--backend", "local", "--runs-root", str(tmp_path / "runs")]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 1, killed.stdout + killed.stderr
    assert "FAILED" in killed.stdout
    layout = RunLayout(tmp_path / "runs" / "killed")
    cell_id = make_plan(load_grid(grid_file)).cells[0].cell_id
    resume = train_attempt(layout, cell_id).resume
    assert [p.name for p in resume.glob("*.pt")] == ["step-000000008.pt"]
    assert list(resume.glob(".step-000000016.pt.*.tmp"))  # the half-written file the kill left

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = "".join(p.read_text() for p in train_folder(layout, cell_id).jobs.glob("*_log.out"))
    assert "resuming from step-000000008.pt" in log
    _assert_same_training(uninterrupted, (layout, cell_id))
    record = json.loads(train_folder(layout, cell_id).result.read_text())
    assert [s["ended_by"] for s in record["details"]["segments"]] == ["killed after its last checkpoint", "finished"]
    assert not resume.exists()  # checkpoints are dropped once the record is written


def test_warning_signal_stops_at_the_configured_time_before_the_jobs_end():
    """SLURM may send --signal's warning up to 60 s early; the training uses that time."""
    import signal
    import time

    from dpr_hpc.resume.signals import StopRequest

    far = StopRequest(end_time=lambda: time.time() + 60, margin_s=30)
    far._note(signal.SIGUSR2, None)
    assert not far.requested()  # 30 s of training left before the margin
    near = StopRequest(end_time=lambda: time.time() + 20, margin_s=30)
    near._note(signal.SIGUSR2, None)
    assert near.requested() and near.reason == "SIGUSR2"
    unknown_end = StopRequest(end_time=lambda: None, margin_s=30)
    unknown_end._note(signal.SIGUSR2, None)
    assert unknown_end.requested()
    terminated = StopRequest(end_time=lambda: time.time() + 600, margin_s=30)
    terminated._note(signal.SIGTERM, None)
    assert terminated.requested() and terminated.reason == "SIGTERM"
    assert not StopRequest().requested()


@pytest.mark.slow
def test_local_time_limit_checkpoints_and_restarts_the_training_until_it_finishes(demo_assets, tmp_path):
    """`--time-limit 0.5` (30 s) with the warning 12 s before it: submitit's local controller
    sends USR2, the training checkpoints at the next step and is restarted from there.

    The training outlasts its first run by construction, not by an epoch count tuned to one
    CPU: DPR_HPC_HOLD_TRAINING (which the local backend's job processes inherit) parks it at a
    step boundary until the test sees the second segment start, then releases it."""
    from waiting import wait_until

    grid_file = write_grid(tmp_path, GRID.format(name="limited", demo=demo_assets, every=0), "limited.yaml")
    hold = tmp_path / "hold"
    hold.touch()
    command = [sys.executable, "-m", "dpr_hpc", "submit", str(grid_file), "--backend", "local", "--runs-root", str(tmp_path / "runs"),
               "--time-limit", "0.5", "--signal-delay", "12"]
    submit = subprocess.Popen(command, env={**os.environ, "DPR_HPC_HOLD_TRAINING": str(hold)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def restarted() -> bool:
            return any(json.loads(p.read_text())["restarts"] >= 1
                       for p in (tmp_path / "runs" / "store").glob("train/*/r0/attempts/*/progress.json"))

        wait_until(lambda: restarted() or submit.poll() is not None, "the training's second segment", timeout_s=600)
        hold.unlink()  # the second segment runs on to the end
        out, _ = submit.communicate(timeout=900)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, out
    (record_file,) = (tmp_path / "runs" / "store").glob("train/*/r0/result.json")
    record = json.loads(record_file.read_text())
    segments = record["details"]["segments"]
    assert len(segments) >= 2 and [s["ended_by"] for s in segments] == ["SIGUSR2"] * (len(segments) - 1) + ["finished"]
    assert sum(s["steps"] for s in segments) == record["metrics"]["steps"] == 3 * 24
    assert record["timings"]["ttt_s"] == pytest.approx(sum(s["train_s"] for s in segments), rel=1e-12)


class _EndedRun:
    """A local job that has ended: with a result (the training finished) or without one."""

    def __init__(self, folder, finished: bool) -> None:
        self.paths = SimpleNamespace(result_pickle=folder.jobs / ("result.pkl" if finished else "no-result.pkl"),
                                     stderr=folder.jobs / "log.err")
        if finished:
            self.paths.result_pickle.parent.mkdir(parents=True, exist_ok=True)
            self.paths.result_pickle.write_bytes(b"")
        self.finished = finished

    def done(self) -> bool:
        return True

    def result(self):
        if not self.finished:
            import submitit

            raise submitit.core.utils.UncompletedJobError("Caught signal SIGUSR2 on vm: this job is timed-out.")


@pytest.mark.parametrize("ends", [("interrupted", "interrupted", "finished"), ("failed",)])
def test_a_training_the_local_controller_stops_resumable_is_started_again_and_a_failed_one_is_not(data_files, tmp_path, ends):
    """submitit's local controller runs a job at most 6 times; a training that still stops at
    its time limit, its checkpoint written, is started again by the backend (a failure path:
    the controller is faked, the records and markers are the real ones)."""
    from conftest import ONE_CELL_GRID
    from dpr_hpc.backends.local import LocalBackend
    from dpr_hpc.backends.submit_report import SubmitReport
    from dpr_hpc.store.records import Records
    from dpr_hpc.store.bindings import save_plan
    from dpr_hpc.store.markers import mark_failed, mark_interrupted
    from test_status import complete

    grid = write_grid(data_files, ONE_CELL_GRID)
    plan = make_plan(load_grid(grid))
    layout = RunLayout(tmp_path / "runs" / "g")
    save_plan(layout, plan, grid)
    train = next(plan.jobs())
    folder = layout.store.job(train)
    lines: list[str] = []
    backend = LocalBackend(layout, plan, echo=lines.append)
    starts = iter(ends)

    def start(executor, job):
        end = next(starts)
        attempt = folder.working_attempt(None)
        attempt.dir.mkdir(parents=True, exist_ok=True)
        if end == "interrupted":
            mark_interrupted(attempt, "SIGUSR2")
        elif end == "failed":
            mark_failed(attempt, RuntimeError("loss is NaN"))
        else:
            complete(layout, plan, job)
        return _EndedRun(folder, finished=end == "finished")

    backend._start = start
    report = SubmitReport()
    backend._run_one(train, "[1/1] train r0", report, Records(layout.store))
    assert next(starts, None) is None  # every run given was started, and no more
    restarted = [line for line in lines if "starting it again" in line]
    if ends[-1] == "finished":
        assert report.ran == [train] and not report.failed and len(restarted) == 2
    else:
        assert report.failed == [train] and not restarted and "FAILED" in lines[-2]
