"""Data in one command: a grid names DPR's files (`train: dpr:nq-train`), and `dpr-hpc prefetch`
downloads them into the data folder, resumes a download that was killed, refuses a file that is
not the published or pinned one, and is offline once the files are there.

DPR's server is a loopback one (tests/data_server.py, with Range requests) serving small files
in DPR's layout; DPR_HPC_DATA_MIRROR points prefetch at it. The three large files have
published MD5s, which small stand-ins cannot match, so most tests give their digests through a
catalog file (DPR_HPC_DATA_CATALOG), as a site with its own sources would.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_grid
from data_server import DataServer
from waiting import wait_until
from dpr_hpc.grid.sources import local_path
from dpr_hpc.inputs import sources

REPO = Path(__file__).resolve().parents[1]


def biencoder(questions: int, tag: str) -> bytes:
    """A biencoder file whose records keep their positives and hard negatives in order."""
    records = [{"question": f"{tag} question {i}?", "answers": [f"answer {i}"],
                "positive_ctxs": [{"title": f"T{i}", "text": f"gold passage {i}", "passage_id": f"{i}"}],
                "negative_ctxs": [],
                "hard_negative_ctxs": [{"title": f"H{i}.{j}", "text": f"hard negative {j} of {i}", "passage_id": f"{1000 + 10 * i + j}"}
                                       for j in range(3)]}
               for i in range(questions)]
    return json.dumps(records, indent=1).encode()


# The plain files the stages read, and what the server serves (gzip where DPR's server does).
PLAIN = {
    "dpr:nq-train": biencoder(400, "train"),  # ~90 KB: large enough to interrupt part-way
    "dpr:nq-dev": biencoder(20, "dev"),
    "dpr:psgs_w100": b"id\ttext\ttitle\n" + b"".join(b"%d\tpassage %d text\tTitle %d\n" % (i, i, i) for i in range(1, 200)),
    "dpr:nq-test": b"".join(b"who is question %d?\t['answer %d']\n" % (i, i) for i in range(30)),
}
URLS = {
    "dpr:nq-train": "data/retriever/biencoder-nq-train.json.gz",
    "dpr:nq-dev": "data/retriever/biencoder-nq-dev.json.gz",
    "dpr:psgs_w100": "wikipedia_split/psgs_w100.tsv.gz",
    "dpr:nq-test": "data/retriever/nq-test.qa.csv",
}
SERVED = {URLS[name]: gzip.compress(body, mtime=0) if URLS[name].endswith(".gz") else body for name, body in PLAIN.items()}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server():
    with DataServer(SERVED) as running:
        yield running


@pytest.fixture
def data_env(tmp_path, monkeypatch, server):
    """A data folder of this test's own, the loopback mirror, and a catalog giving the small
    files' MD5s in place of the published ones (same names, same URLs)."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("".join(f"{name}: {{url: {URLS[name]}, md5: {md5(SERVED[URLS[name]])}}}\n"
                               for name in ("dpr:nq-train", "dpr:nq-dev", "dpr:psgs_w100")))
    env = {"DPR_HPC_DATA_DIR": str(tmp_path / "data"), "DPR_HPC_DATA_MIRROR": server.url, "DPR_HPC_DATA_CATALOG": str(catalog)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def named_grid(folder: Path) -> Path:
    """One cell whose train and dev files are DPR's, by name (the encoder is a local folder, so
    prefetch asks no hub; an empty folder is enough for it and for loading the grid)."""
    (folder / "local-model").mkdir(exist_ok=True)
    return write_grid(folder, """
        name: named
        data: {train: "dpr:nq-train", dev: "dpr:nq-dev"}
        blocks:
          - {name: b, encoder: ./local-model, embedding_sizes: [8]}
    """)


def part_file(name: str) -> Path:
    return local_path(name).with_name(URLS[name].rsplit("/", 1)[-1] + ".part")


def test_prefetch_fetches_the_sources_a_grid_names_verifies_them_and_the_grid_reads_the_plain_files(data_env, server, tmp_path, capsys):
    grid = named_grid(tmp_path)
    code, out, err = run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")
    assert code == 0, err
    for name in ("dpr:nq-train", "dpr:nq-dev"):
        assert local_path(name).read_bytes() == PLAIN[name]  # verified, then decompressed for the stages
        assert not part_file(name).exists()
        assert f"  {name}  {local_path(name)}" in out
    pins = json.loads((tmp_path / "data" / "pins.json").read_text())["sources"]
    assert pins["dpr:nq-dev"]["download_sha256"] == sha256(SERVED[URLS["dpr:nq-dev"]])
    assert pins["dpr:nq-dev"]["sha256"] == sha256(PLAIN["dpr:nq-dev"])
    assert "matching its listed md5" in out

    from dpr_hpc.grid import load_grid

    [cell] = load_grid(grid).cells  # require_data: the named files are here now
    assert cell.data_path("train") == local_path("dpr:nq-train") == sources.resolve("dpr:nq-train")
    assert cell.data.train == "dpr:nq-train"  # the name, not this machine's path, is in the cell id


def test_the_corpus_sources_fetch_and_resolve_and_a_path_resolves_to_itself(data_env, tmp_path):
    got = sources.fetch_all(["dpr:psgs_w100", "dpr:nq-test", "relative/file.tsv", "dpr:nq-test"], echo=lambda line: None)
    assert list(got) == ["dpr:psgs_w100", "dpr:nq-test"]
    assert sources.resolve("dpr:psgs_w100").read_bytes() == PLAIN["dpr:psgs_w100"]
    assert sources.resolve("dpr:nq-test").name == "nq-test.qa.csv"  # served plain, kept as served
    assert sources.resolve("relative/file.tsv", base_dir=tmp_path) == tmp_path / "relative" / "file.tsv"


def test_after_the_first_prefetch_a_second_makes_no_request_even_with_the_server_gone(data_env, server, tmp_path, capsys):
    grid = named_grid(tmp_path)
    assert run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")[0] == 0
    asked = len(server.requests)
    server.stop()
    code, out, err = run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")
    assert code == 0, err
    assert len(server.requests) == asked
    assert "fetching" not in out and "  dpr:nq-train  " in out


def test_a_prefetch_killed_mid_download_resumes_from_its_part_file(data_env, server, tmp_path, capsys):
    grid = named_grid(tmp_path)
    body = SERVED[URLS["dpr:nq-train"]]
    server.hold(URLS["dpr:nq-train"], after=len(body) // 3)
    child = subprocess.Popen([sys.executable, "-m", "dpr_hpc", "prefetch", str(grid), "--runs-root", str(tmp_path / "runs")],
                             env={**os.environ, **data_env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = part_file("dpr:nq-train")
    try:
        wait_until(lambda: part.exists() and part.stat().st_size >= len(body) // 3, "the download to stop part-way", timeout_s=120)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    had = part.stat().st_size
    assert 0 < had < len(body) and not local_path("dpr:nq-train").exists()

    server.release()
    code, out, err = run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")
    assert code == 0, err
    assert (URLS["dpr:nq-train"], f"bytes={had}-") in server.requests  # asked only for the rest
    assert f"resuming {server.url}{URLS['dpr:nq-train']}" in out
    assert local_path("dpr:nq-train").read_bytes() == PLAIN["dpr:nq-train"]
    assert not part.exists()


def test_a_server_that_ignores_range_sends_the_whole_file_again_and_it_is_still_verified(data_env, server):
    part = part_file("dpr:nq-dev")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes of an earlier try")
    server.ranges = False
    lines: list[str] = []
    sources.fetch("dpr:nq-dev", echo=lines.append)
    assert any("does not resume downloads" in line for line in lines)
    assert local_path("dpr:nq-dev").read_bytes() == PLAIN["dpr:nq-dev"]


def test_a_download_complete_but_not_yet_checked_when_killed_is_checked_without_fetching_it_again(data_env, server):
    part = part_file("dpr:nq-dev")
    part.parent.mkdir(parents=True)
    part.write_bytes(SERVED[URLS["dpr:nq-dev"]])
    sources.fetch("dpr:nq-dev", echo=lambda line: None)
    assert server.requests == [(URLS["dpr:nq-dev"], f"bytes={len(SERVED[URLS['dpr:nq-dev']])}-")]  # answered 416: all there
    assert local_path("dpr:nq-dev").read_bytes() == PLAIN["dpr:nq-dev"]


def test_a_download_that_differs_from_its_pin_is_refused_naming_the_file_and_both_digests(data_env, server, tmp_path, capsys):
    grid = named_grid(tmp_path)
    assert run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")[0] == 0
    pins_before = (tmp_path / "data" / "pins.json").read_text()
    local_path("dpr:nq-dev").unlink()  # gone here, so prefetch downloads it again ...
    corrupted = bytearray(SERVED[URLS["dpr:nq-dev"]])
    corrupted[100] ^= 0xFF
    server.files[URLS["dpr:nq-dev"]] = bytes(corrupted)  # ... and the server now sends other bytes

    code, out, err = run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")
    assert code == 2
    [line] = err.strip().splitlines()  # one line, no traceback
    assert "biencoder-nq-dev.json.gz" in line and "refused" in line
    assert sha256(bytes(corrupted)) in line and sha256(SERVED[URLS["dpr:nq-dev"]]) in line
    assert not local_path("dpr:nq-dev").exists() and not part_file("dpr:nq-dev").exists()  # nothing left as if good
    assert (tmp_path / "data" / "pins.json").read_text() == pins_before


def test_a_first_download_that_is_not_the_published_file_is_refused_naming_both_md5s(data_env, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("DPR_HPC_DATA_CATALOG")  # DPR's nq-dev as published: the stand-in cannot match it
    code, out, err = run_cli(capsys, "prefetch", named_grid(tmp_path), "--runs-root", tmp_path / "runs")
    assert code == 2
    [line] = err.strip().splitlines()
    assert md5(SERVED[URLS["dpr:nq-train"]]) in line and "a1c927b5adae71388eb064329387709f" in line and "biencoder-nq-train.json.gz" in line
    assert not local_path("dpr:nq-train").exists() and not part_file("dpr:nq-train").exists()
    assert not (tmp_path / "data" / "pins.json").exists()


def test_an_unreachable_server_is_an_error_naming_the_url(data_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DPR_HPC_DATA_MIRROR", "http://127.0.0.1:9/dpr/")  # nothing listens on port 9
    code, out, err = run_cli(capsys, "prefetch", named_grid(tmp_path), "--runs-root", tmp_path / "runs")
    assert code == 2
    [line] = err.strip().splitlines()
    assert "cannot reach http://127.0.0.1:9/dpr/data/retriever/biencoder-nq-train.json.gz" in line


def test_a_named_file_changed_after_prefetch_is_refused_by_submit_and_fetched_again_by_prefetch(data_env, server, tmp_path, capsys):
    grid = named_grid(tmp_path)
    assert run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")[0] == 0
    local_path("dpr:nq-dev").write_bytes(biencoder(20, "edited"))
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", tmp_path / "runs")
    assert code == 2
    assert "dpr:nq-dev" in err and sha256(PLAIN["dpr:nq-dev"]) in err and "prefetch" in err
    code, out, err = run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")
    assert code == 0, err
    assert "downloading it again" in out
    assert local_path("dpr:nq-dev").read_bytes() == PLAIN["dpr:nq-dev"]


def test_a_named_file_copied_over_with_the_same_bytes_is_hashed_once_and_then_trusted_by_its_stat(data_env, server, monkeypatch):
    sources.fetch("dpr:nq-test", echo=lambda line: None)
    path = local_path("dpr:nq-test")
    path.unlink()
    path.write_bytes(PLAIN["dpr:nq-test"])  # a new inode and mtime, the same content
    hashed: list[Path] = []
    digest = sources._digest
    monkeypatch.setattr(sources, "_digest", lambda p, md5=False: hashed.append(p) or digest(p, md5))
    monkeypatch.setattr(sources, "settled", lambda stat: True)  # as it reads once its last change is 2 s old
    assert sources.resolve("dpr:nq-test") == path
    assert sources.resolve("dpr:nq-test") == path
    assert hashed == [path]


def test_a_named_file_changed_in_the_last_seconds_is_hashed_every_time_never_trusted_by_its_stat(data_env, server, monkeypatch):
    """As the content-hash memo: a same-size rewrite within one timestamp tick keeps size and
    mtime, so a stat taken while the file may still change is not remembered."""
    sources.fetch("dpr:nq-test", echo=lambda line: None)
    path = local_path("dpr:nq-test")
    path.write_bytes(PLAIN["dpr:nq-test"])  # rewritten in place just now
    hashed: list[Path] = []
    digest = sources._digest
    monkeypatch.setattr(sources, "_digest", lambda p, md5=False: hashed.append(p) or digest(p, md5))
    assert sources.resolve("dpr:nq-test") == path
    assert sources.resolve("dpr:nq-test") == path
    assert hashed == [path, path]


def test_a_read_only_data_folder_is_still_verified_and_only_the_remembering_is_skipped(data_env, server, monkeypatch, caplog):
    sources.fetch("dpr:nq-test", echo=lambda line: None)
    path = local_path("dpr:nq-test")
    path.unlink()
    path.write_bytes(PLAIN["dpr:nq-test"])
    monkeypatch.setattr(sources, "settled", lambda stat: True)

    def read_only(self, name, pin):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(sources.DataPins, "update", read_only)
    assert sources.resolve("dpr:nq-test") == path  # no traceback: verified by its bytes
    assert "could not be remembered" in caplog.text and "Permission denied" in caplog.text


def test_a_grid_naming_an_unknown_source_is_a_grid_error_listing_the_known_ones(data_env, tmp_path, capsys):
    grid = write_grid(tmp_path, """
        name: typo
        data: {train: "dpr:nq-trian", dev: "dpr:nq-dev"}
        blocks: [{name: b, encoder: ./m, embedding_sizes: [8]}]
    """)
    code, out, err = run_cli(capsys, "plan", grid)
    assert code == 2
    assert "data.train" in err and "'dpr:nq-trian'" in err and "dpr:nq-train" in err and "dpr:psgs_w100" in err


def test_before_prefetch_plan_notes_the_named_files_and_submit_names_the_command_that_fetches_them(data_env, tmp_path, capsys):
    grid = named_grid(tmp_path)
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", tmp_path / "runs")
    assert code == 2
    assert f"{local_path('dpr:nq-train')} (dpr:nq-train: 'dpr-hpc prefetch' downloads it)" in err


def test_a_corpus_named_by_its_sources_is_fetched_by_prefetch_and_read_from_the_data_folder(data_env, server, tmp_path, capsys):
    (tmp_path / "local-model").mkdir()
    grid = write_grid(tmp_path, """
        name: wiki
        data: {train: "dpr:nq-train", dev: "dpr:nq-dev"}
        defaults:
          corpus: {passages: "dpr:psgs_w100", questions: "dpr:nq-test", shards: 50, parallel: 8}
        blocks:
          - {name: b, encoder: ./local-model, embedding_sizes: [8]}
    """)
    code, out, err = run_cli(capsys, "prefetch", grid, "--runs-root", tmp_path / "runs")
    assert code == 0, err
    assert f"  dpr:psgs_w100  {local_path('dpr:psgs_w100')}" in out and f"  dpr:nq-test  {local_path('dpr:nq-test')}" in out

    from dpr_hpc.grid import load_grid

    [cell] = load_grid(grid).cells
    assert cell.corpus_path("passages") == local_path("dpr:psgs_w100") and cell.corpus.passages == "dpr:psgs_w100"
    assert cell.corpus_path("questions") == local_path("dpr:nq-test")


def test_a_corpus_naming_an_unknown_source_is_a_grid_error_naming_the_key(data_env, tmp_path, capsys):
    grid = write_grid(tmp_path, """
        name: typo
        data: {train: "dpr:nq-train", dev: "dpr:nq-dev"}
        defaults:
          corpus: {passages: "dpr:psgs_w1000", questions: "dpr:nq-test", shards: 2}
        blocks: [{name: b, encoder: ./m, embedding_sizes: [8]}]
    """)
    code, out, err = run_cli(capsys, "plan", grid)
    assert code == 2
    assert "defaults.corpus.passages" in err and "'dpr:psgs_w1000'" in err and "dpr:psgs_w100" in err
