"""`dpr-hpc logs -f`: follows a running job's log as it grows, ends when the job ends, and
Ctrl-C stops it with exit 130 and no traceback."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading

from conftest import one_cell_run
from dpr_hpc.store.claims import claim_stage


class Follower:
    """`dpr-hpc logs CELL -f` in its own process, its stdout read line by line as it comes."""

    def __init__(self, cell_id: str, runs_root) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "dpr_hpc", "logs", cell_id, "--stage", "train", "-f", "--runs-root", str(runs_root)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()

    def wait_for(self, text: str, timeout_s: float = 60) -> None:
        """Block until a printed line holds `text` (waiting on the output, not on a sleep)."""
        seen = []
        while not any(text in line for line in seen):
            try:
                seen.append(self.lines.get(timeout=timeout_s))
            except queue.Empty:
                raise AssertionError(f"logs -f printed no line with {text!r} in {timeout_s}s; it printed {seen}") from None

    def end(self, timeout_s: float = 60) -> tuple[int, str]:
        try:
            return self.process.wait(timeout=timeout_s), self.process.stderr.read()
        finally:
            if self.process.poll() is None:
                self.process.kill()


def running_job_log(data_files, tmp_path):
    """A one-cell run whose training is running: its claim held (by this test) and its log begun."""
    layout, plan, train = one_cell_run(data_files, tmp_path)
    folder = layout.store.job(train)
    claim = claim_stage(folder, train)
    folder.jobs.mkdir(parents=True, exist_ok=True)
    log = folder.jobs / "4242_0_log.out"
    log.write_text("epoch 1/3  loss 2.0794\n")
    return layout, plan.cells[0].cell_id, claim, log


def test_logs_follow_prints_new_lines_as_the_job_writes_them_and_ctrl_c_exits_130(data_files, tmp_path):
    layout, cell_id, claim, log = running_job_log(data_files, tmp_path)
    try:
        follower = Follower(cell_id, layout.runs_root)
        follower.wait_for("epoch 1/3")
        with log.open("a") as handle:
            handle.write("epoch 2/3  loss 1.5021\n")
        follower.wait_for("epoch 2/3")  # printed as the job writes it
        follower.process.send_signal(signal.SIGINT)
        code, err = follower.end()
        assert (code, err) == (130, "")  # Ctrl-C is how a user stops following: no message, no traceback
    finally:
        claim.release()


def test_logs_follow_ends_with_exit_0_once_the_job_ends_printing_its_last_lines(data_files, tmp_path):
    layout, cell_id, claim, log = running_job_log(data_files, tmp_path)
    follower = Follower(cell_id, layout.runs_root)
    follower.wait_for("epoch 1/3")
    with log.open("a") as handle:
        handle.write("finished: 72 steps\n")
    claim.release()  # the job ends
    follower.wait_for("finished: 72 steps")
    code, err = follower.end()
    assert code == 0, err
