"""Every job state SLURM documents reads as a defined status (fake sacct/squeue/scancel on PATH);
a scheduler that does not answer is an error, never a view in which every job is gone."""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timedelta, timezone

import pytest

from conftest import run_cli, submitted_run
from fake_slurm import install, queue_line, write_command
from dpr_hpc.errors import SchedulerUnreachableError
from dpr_hpc.tracking import live, slurm_queue
from dpr_hpc.tracking.ledger import UNLISTED_GRACE_S, Ledger
from dpr_hpc.store.records import Records
from dpr_hpc.tracking.status import stage_states, summary_line

# The JOB STATE CODES of SLURM's sacct and squeue documentation, and what each must read as.
DOCUMENTED = {
    "BOOT_FAIL": "FAILED", "CANCELLED": "CANCELLED", "COMPLETED": "COMPLETED", "CONFIGURING": "RUNNING",
    "COMPLETING": "RUNNING", "DEADLINE": "FAILED", "FAILED": "FAILED", "NODE_FAIL": "FAILED",
    "OUT_OF_MEMORY": "FAILED", "PENDING": "PENDING", "PREEMPTED": "INTERRUPTED", "RUNNING": "RUNNING",
    "RESV_DEL_HOLD": "HELD", "REQUEUE_FED": "REQUEUED", "REQUEUE_HOLD": "HELD", "REQUEUED": "REQUEUED",
    "RESIZING": "RUNNING", "REVOKED": "RUNNING", "SIGNALING": "RUNNING", "SPECIAL_EXIT": "HELD",
    "STAGE_OUT": "RUNNING", "STOPPED": "HELD", "SUSPENDED": "HELD", "TIMEOUT": "TIMEOUT",
}
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "HELD"}


def _fake(bin_dir, name: str, body: str) -> None:
    write_command(bin_dir, name, body)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    return install(tmp_path / "fake-slurm", monkeypatch, {
        "sbatch": "exit 1",
        "scancel": 'echo "scancel: error: Kill job error on job id 5: Access/permission denied" >&2; exit 1',
    })


# The columns the fake sacct's lines are written in: the code must ask for exactly these.
SACCT_COLUMNS = "JobIDRaw,State,ExitCode,NodeList,Elapsed,Reason"


@pytest.mark.parametrize(("state", "status"), sorted(DOCUMENTED.items()))
def test_every_documented_slurm_state_has_a_defined_status(fake_slurm, state, status):
    (fake_slurm / "sacct.out").write_text(f"5|{state}|0:0|node3|00:10:00|None\n")
    info = slurm_queue.query(["5"]).jobs["5"]
    assert (info.status, info.active) == (status, status in ACTIVE)
    assert f"-o {SACCT_COLUMNS}" in (fake_slurm / "sacct.args").read_text()


@pytest.mark.parametrize(("state", "status"), sorted(DOCUMENTED.items()))
def test_every_documented_state_read_from_squeue_without_accounting_has_the_same_status(fake_slurm, state, status):
    """squeue stands in for sacct without accounting: the fake prints the queue in the format
    the code asks for (squeue -o), as squeue does, so the parser meets squeue's real lines."""
    (fake_slurm / "sacct.fail").write_text("sacct: error: Slurm accounting storage is disabled\n")
    (fake_slurm / "queue").write_text(queue_line("5", state, "node3", "10:00", "Priority" if state == "PENDING" else "None"))
    view = slurm_queue.query(["5"])
    info = view.jobs["5"]
    assert view.source.startswith("squeue") and (info.state, info.status, info.active) == (state, status, status in ACTIVE)
    assert (info.node, info.elapsed, info.reason) == ("node3", "10:00", "Priority" if state == "PENDING" else "")


# Raw lines through the real parser: sacct writes who cancelled a job into its state
# ('CANCELLED by 1234'), and 'None assigned' for a job that never had a node.
@pytest.mark.parametrize(("line", "expected"), [
    ("5|CANCELLED by 1234|0:0|None assigned|00:00:00|None", ("CANCELLED", "CANCELLED", "", True)),
    ("5|CANCELLED by 0|0:15|node2|01:02:03|None", ("CANCELLED", "CANCELLED", "node2", False)),
    ("5|PENDING|0:0|None assigned|00:00:00|DependencyNeverSatisfied", ("PENDING", "PENDING", "", False)),
    ("5|RUNNING|0:0|node[1-2]|00:10:00|None", ("RUNNING", "RUNNING", "node[1-2]", False)),
], ids=["cancelled by a user before it ran", "cancelled by root while running", "pending on a dead dependency", "running"])
def test_raw_sacct_lines_read_as_their_status(fake_slurm, line, expected):
    (fake_slurm / "sacct.out").write_text(line + "\n")
    info = slurm_queue.query(["5"]).jobs["5"]
    assert (info.state, info.status, info.node, info.never_started) == expected
    assert info.waits_on_a_dead_dependency == ("DependencyNeverSatisfied" in line)


def test_the_table_covers_what_slurm_documents_and_held_states_are_not_failures():
    assert set(DOCUMENTED) <= set(slurm_queue.SLURM_STATES)
    for held in ("STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD"):
        assert slurm_queue.JobInfo("1", held).active and slurm_queue.JobInfo("1", held).status != "FAILED"
    assert slurm_queue.JobInfo("1", "SOME_FUTURE_STATE").active  # left alone, not resubmitted


@pytest.fixture
def run(data_files, tmp_path):
    layout, plan, _ = submitted_run(data_files, tmp_path, "5")
    return layout, plan


@pytest.mark.parametrize("state", ["STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD"])
def test_status_shows_held_jobs_as_held_and_their_dependants_waiting(fake_slurm, run, state):
    layout, plan = run
    (fake_slurm / "sacct.out").write_text(f"5|{state}|0:0|node3|01:00:00|None\n")
    states = stage_states(layout, plan).states
    assert [s.state for s in states] == ["HELD", "PENDING", "PENDING"]
    assert summary_line(states) == "3 stage jobs: 2 PENDING, 1 HELD"


def test_sacct_and_squeue_ask_for_the_ledgers_users_from_its_first_submission(fake_slurm, run):
    layout, plan = run
    (fake_slurm / "sacct.out").write_text("")
    (fake_slurm / "queue").write_text(queue_line("5", "PENDING", reason="Priority"))
    assert stage_states(layout, plan).states[0].state == "PENDING"
    first = Ledger.read(layout.store).first_submission()
    since = (first - slurm_queue.SINCE_MARGIN).astimezone().strftime("%Y-%m-%dT%H:%M:%S")
    sacct_args = (fake_slurm / "sacct.args").read_text().split()
    assert sacct_args[sacct_args.index("-S") + 1] == since and sacct_args[sacct_args.index("-u") + 1] == getpass.getuser()
    assert f"-u {getpass.getuser()}" in (fake_slurm / "squeue.args").read_text()
    assert first <= datetime.now(timezone.utc)


def test_an_unreachable_scheduler_is_an_error_not_failed_rows(fake_slurm, run, capsys):
    layout, _ = run
    _fake(fake_slurm, "sacct", 'echo "sacct: error: Problem talking to the database: Connection refused" >&2; exit 1')
    _fake(fake_slurm, "squeue", 'echo "squeue: error: Unable to contact slurm controller (connect failure)" >&2; exit 1')
    with pytest.raises(SchedulerUnreachableError, match="connect failure"):
        slurm_queue.query(["5"])
    code, out, err = run_cli(capsys, "status", layout.root)
    assert code == 0 and "FAILED" not in out and "UNKNOWN" in out
    assert "states from the store only: scheduler unreachable: sacct: sacct: error: Problem talking" in out


def test_a_failing_scancel_is_one_line(fake_slurm, run, capsys):
    layout, _ = run
    (fake_slurm / "sacct.out").write_text("5|RUNNING|0:0|node3|00:10:00|None\n")
    code, out, err = run_cli(capsys, "cancel", layout.root)
    assert code == 1 and err == "dpr-hpc: error: scancel: error: Kill job error on job id 5: Access/permission denied\n"


def _submitted_long_ago(layout) -> None:
    """The ledger's submissions made older than the grace period in which an unlisted job is
    taken for one sacct has not caught up with."""
    log = layout.store.ledger_file
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    old = (datetime.now(timezone.utc) - timedelta(seconds=UNLISTED_GRACE_S + 60)).isoformat()
    log.write_text("".join(json.dumps({**e, "submitted_at": old}) + "\n" for e in entries))


SQUEUE_TIMES_OUT = {"message": "squeue: error: slurm_load_jobs error: Socket timed out on send/recv operation"}


@pytest.fixture
def lagging_sacct_and_failing_squeue(fake_slurm, run):
    """sacct answers but has not listed job 5 yet (it lags), and squeue fails."""
    layout, plan = run
    _submitted_long_ago(layout)
    (fake_slurm / "sacct.out").write_text("")
    (fake_slurm / "squeue.fail").write_text(json.dumps(SQUEUE_TIMES_OUT))
    return layout, plan


def test_a_job_sacct_has_not_listed_is_unknown_when_squeue_fails_never_failed(fake_slurm, lagging_sacct_and_failing_squeue, capsys):
    layout, plan = lagging_sacct_and_failing_squeue
    states = stage_states(layout, plan).states
    assert [s.state for s in states] == ["UNKNOWN", "PENDING", "PENDING"]
    assert states[0].job_id == "5" and "squeue did not answer" in states[0].detail
    code, out, err = run_cli(capsys, "status", layout.root)
    assert code == 0 and "UNKNOWN" in out and "FAILED" not in out and "BLOCKED" not in out
    assert "Socket timed out" in out  # the source line says why


def test_cancel_does_not_pass_over_a_job_of_unknown_state_in_silence(fake_slurm, lagging_sacct_and_failing_squeue, capsys):
    layout, _ = lagging_sacct_and_failing_squeue
    code, out, err = run_cli(capsys, "cancel", layout.root)
    assert code == 1 and "SLURM job(s) 5 not cancelled" in err and "unknown" in err
    assert not (fake_slurm / "scancel.args").exists()


def test_a_submit_resubmits_nothing_whose_state_is_unknown(cached_x_y, fake_slurm, lagging_sacct_and_failing_squeue, capsys):
    """Even with --retry-failed: a pending requeued training that sacct has not listed yet
    must not be queued a second time (the copy would find the first one's claim and exit 4).
    squeue fails only for the state query here (the tag lookup before it answers)."""
    layout, plan = lagging_sacct_and_failing_squeue
    (fake_slurm / "squeue.fail").write_text(json.dumps({**SQUEUE_TIMES_OUT, "when": "%T"}))
    _fake(fake_slurm, "sbatch", 'n=$(cat "$FAKE_SLURM/count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE_SLURM/count"; '
                                'echo "Submitted batch job $((200+n))"')
    for name in ("srun", "sacctmgr", "scontrol"):
        _fake(fake_slurm, name, "exit 1" if name != "srun" else "exit 0")
    code, out, err = run_cli(capsys, "submit", layout.root.parent.parent / "grid.yaml", "--backend", "slurm", "--retry-failed",
                             "--runs-root", layout.root.parent)
    entries = Ledger.read(layout.store).entries
    train = next(job for job in plan.jobs())
    assert [e["job_id"] for e in entries[train.id]] == ["5"], (out + err, entries)
    assert "left alone: SLURM job 5's state is unknown" in out, (out, entries)
    assert "afterok:5" in "".join(p.read_text() for p in layout.store.root.rglob("*.sh") if "dpr-index" in p.read_text())


def test_a_local_submit_does_not_run_a_slurm_job_of_unknown_state(cached_x_y, fake_slurm, lagging_sacct_and_failing_squeue, capsys):
    layout, plan = lagging_sacct_and_failing_squeue
    code, out, err = run_cli(capsys, "submit", layout.root.parent.parent / "grid.yaml", "--backend", "local", "--runs-root", layout.root.parent)
    assert "left alone: SLURM job 5's state is unknown" in out, out + err
    assert not any(check.complete for check in (Records(layout.store).check(job) for job in plan.jobs()))


def test_the_live_view_of_an_unreachable_scheduler_holds_no_standing_and_refuses_to_be_acted_on(fake_slurm, run):
    """One policy for every caller: no standing (so no job reads as gone), the reason, and an
    error for a caller that would act on the answer (submit)."""
    layout, plan = run
    _fake(fake_slurm, "sacct", 'echo "sacct: error: Connection refused" >&2; exit 1')
    _fake(fake_slurm, "squeue", 'echo "squeue: error: Unable to contact slurm controller" >&2; exit 1')
    view = live.ask(Ledger.read(layout.store), plan.jobs())
    assert list(view.job_ids.values()) == ["5"] and view.standings == {} and view.may_still_run() == {}
    assert "Unable to contact slurm controller" in view.unanswered
    with pytest.raises(SchedulerUnreachableError, match="Unable to contact"):
        view.require()


def test_the_live_view_keeps_a_job_sacct_has_not_listed_as_one_that_may_still_run(fake_slurm, lagging_sacct_and_failing_squeue):
    layout, plan = lagging_sacct_and_failing_squeue
    view = live.ask(Ledger.read(layout.store), plan.jobs()).require()
    (job, standing), = view.standings.items()
    assert standing.unknown and view.may_still_run() == {job: standing} and "sacct" in view.source


def test_the_live_view_without_slurm_commands_says_so_and_asks_nothing(run, monkeypatch):
    layout, plan = run
    monkeypatch.setattr(slurm_queue, "slurm_available", lambda: False)
    view = live.ask(Ledger.read(layout.store), plan.jobs())
    assert view.no_slurm_here and view.standings == {} and list(view.job_ids.values()) == ["5"]
    assert live.ask(Ledger.read(layout.store), []).job_ids == {}  # no submission asked about: nothing to say


def test_a_claim_whose_slurm_job_ended_reads_as_slurm_says_not_running(fake_slurm, run):
    """A task killed on another node (scancel) leaves its claim; its pid there cannot be checked
    from here. Once it has missed two heartbeats and SLURM lists the job that holds it CANCELLED,
    status says CANCELLED, not RUNNING until the heartbeat is 600 s old. A claim still beating is
    a requeue's moment (SLURM reads the job as ended briefly, and its next run takes the claim)."""
    from conftest import held_elsewhere

    layout, plan = run
    train = next(job for job in plan.jobs() if job.stage == "train")
    folder = layout.store.job(train)
    folder.dir.mkdir(parents=True, exist_ok=True)
    silent = -150  # its last heartbeat 150 s ago: two beats missed, not yet stale (600 s)
    (fake_slurm / "sacct.out").write_text("5|CANCELLED by 0|0:9|node7|00:00:05|None\n")
    with held_elsewhere(folder.claim, clock_offset_s=silent, host="node7", slurm_job_id="5"):
        assert stage_states(layout, plan).jobs[train].state == "CANCELLED"
    with held_elsewhere(folder.claim, host="node7", slurm_job_id="5"):  # still beating: a requeue's moment, its next run comes
        assert stage_states(layout, plan).jobs[train].state == "RUNNING"
    (fake_slurm / "sacct.out").write_text("5|RUNNING|0:0|node7|00:00:05|None\n")
    with held_elsewhere(folder.claim, clock_offset_s=silent, host="node7", slurm_job_id="5"):
        assert stage_states(layout, plan).jobs[train].state == "RUNNING"  # the job still runs: its claim stands
    (fake_slurm / "sacct.out").write_text("5|CANCELLED by 0|0:9|node7|00:00:05|None\n")
    with held_elsewhere(folder.claim, clock_offset_s=silent, host="node7", slurm_job_id="6"):
        assert stage_states(layout, plan).jobs[train].state == "RUNNING"  # another job holds it: not the one SLURM ended
