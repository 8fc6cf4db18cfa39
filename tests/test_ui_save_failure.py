"""Issue 11 item 9, the UI's half: a run's last save refused by the file system (full disk, read-only folder) is
never lost. The worker keeps the weights in memory and asks through the job folder; the Training tab shows which
file, the space needed and free and the error, with "Retry save" and "Save to the rescue folder"; a file rescued
outside the workspace is named, never served."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from ui_helpers import real_worker_ui, write

from trainer.checkpoint import SaveFailure
from trainer.config import TrainerConfig
from ui import worker
from ui.app import RankwrightUI
from ui.jobs import SAVE_ANSWER_FILE, SAVE_QUESTION_FILE, JobError, JobRunner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning/gr.Info outside a request
SKIP = {"__type__": "update"}


def refused(path: Path, code: int = errno.ENOSPC, step: int = 7) -> SaveFailure:
    return SaveFailure(path, OSError(code, os.strerror(code), str(path)), 12_000_000, 3_000_000, True, step)


def wait_for(condition, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def answer_later(job_dir: Path, *answers: dict) -> threading.Thread:
    """Answer the worker's question as the UI does, once it is asked; each answer gets the question's id unless
    it names another."""
    def run():
        question = json.loads(wait_for(lambda: (job_dir / SAVE_QUESTION_FILE).is_file() and
                                       (job_dir / SAVE_QUESTION_FILE).read_text(), what="the question"))
        for answer in answers:
            write(job_dir / SAVE_ANSWER_FILE, json.dumps({"id": question["id"], **answer}))
            time.sleep(0.3)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ====================================================================================== the worker's question
def test_the_worker_asks_through_the_job_folder_and_waits_for_the_answer(tmp_path):
    job_dir = (tmp_path / "job")
    job_dir.mkdir()
    ask = worker.save_error_handler(job_dir, timeout=60, interval=0.02)
    failure = refused(tmp_path / "out" / "adapter.safetensors")
    # an answer to another question, then one that is not an action, then the real answer
    thread = answer_later(job_dir, {"id": "an-earlier-question", "action": "rescue"}, {"action": "/etc/passwd"},
                          {"action": "retry"})
    seen: dict = {}

    def remember_question():
        if (job_dir / SAVE_QUESTION_FILE).is_file():
            seen.update(json.loads((job_dir / SAVE_QUESTION_FILE).read_text()))
        return seen

    watcher = threading.Thread(target=lambda: wait_for(remember_question), daemon=True)
    watcher.start()
    started = time.time()
    assert ask(failure) == failure.path  # retry: the same path again
    assert time.time() - started >= 0.5  # the two answers that are not this question's were ignored
    thread.join(5)
    watcher.join(5)
    assert seen["path"] == str(failure.path) and seen["reason"] == "No space left on device"
    assert seen["needed_mb"] == 12.0 and seen["free_mb"] == 3.0 and seen["step"] == 7
    assert seen["deadline"] - seen["asked"] == pytest.approx(60)
    assert any(folder.endswith("rankwright-rescue") for folder in seen["rescue_folders"])
    assert not list(job_dir.iterdir())  # question and answer cleared: the UI stops asking

    answer_later(job_dir, {"action": "rescue"})
    assert ask(refused(failure.path, errno.EROFS)) is None  # the trainer's rescue folders
    assert not list(job_dir.iterdir())


def test_without_an_answer_the_worker_goes_to_the_rescue_folder(tmp_path, monkeypatch):
    job_dir = tmp_path / "job"
    started = time.time()
    assert worker.save_error_handler(job_dir, timeout=0.3, interval=0.02)(refused(tmp_path / "a.safetensors")) is None
    assert 0.3 <= time.time() - started < 5 and not list(job_dir.iterdir())
    # a job folder that cannot even take the question (the same full disk): the rescue folder at once
    blocked = write(tmp_path / "a-file", "not a folder") / "job"
    started = time.time()
    assert worker.save_error_handler(blocked, timeout=60)(refused(tmp_path / "a.safetensors")) is None
    assert time.time() - started < 5
    monkeypatch.setenv(worker.SAVE_ANSWER_TIMEOUT_ENV, "2.5")
    assert worker.answer_timeout() == 2.5
    for text in ("", "soon"):
        monkeypatch.setenv(worker.SAVE_ANSWER_TIMEOUT_ENV, text)
        assert worker.answer_timeout() == worker.SAVE_ANSWER_SECONDS == 30 * 60


# ====================================================================================== the Training tab
@pytest.fixture
def waiting_ui(ws):
    """A UI whose running job (a sleeping process) waits for an answer about its refused last save."""
    runner = JobRunner(ws.jobs, command=lambda config, folder: [sys.executable, "-c", "import time; time.sleep(60)"])
    ui = RankwrightUI(ws, runner=runner, preset_dirs=[])
    ws.default_dataset().mkdir(parents=True)
    config = TrainerConfig.from_dict({"dataset": {"dir": str(ws.default_dataset())}, "train": {"max_steps": 5},
                                      "output": {"dir": str(ws.outputs), "name": "full"}})
    record = runner.submit(ui.confine(config))
    yield ui, record
    runner.kill(record)


def ask_the_ui(record, **fields) -> dict:
    question = {"id": "q1", "path": str(Path(record.output_dir) / "full.safetensors"), "reason": "No space left on "
                "device", "needed_mb": 12.3, "free_mb": 0.4, "step": 5, "deadline": time.time() + 600,
                "rescue_folders": ["/srv/rescue", str(Path.home() / "rankwright-rescue")], **fields}
    write(Path(record.folder) / SAVE_QUESTION_FILE, json.dumps(question))
    return question


def test_the_training_tab_shows_a_refused_save_and_sends_the_answer(waiting_ui):
    ui, record = waiting_ui
    box, text, session = ui.poll_save({})
    assert box == {"__type__": "update", "visible": False} and text == ""
    assert ui.poll_save(session)[:2] == (SKIP, SKIP)  # nothing re-sent while nothing changed
    with pytest.raises(JobError, match="no save is waiting"):
        ui.save_answer("retry")

    question = ask_the_ui(record)
    box, text, session = ui.poll_save(session)
    assert box["visible"] is True
    assert f"Writing `{question['path']}` failed at step 5: **No space left on device**" in text
    assert "**12.3 MB**" in text and "**0.4 MB** are free" in text and "`/srv/rescue`" in text
    assert "Retry save" in text and "Save to the rescue folder" in text and "Without an answer by" in text
    status, *_, log_text, _files, _compared, _choices, _runs, _ = ui.poll({})
    assert "waiting for your answer" in status and "could not write" in log_text

    assert "Retrying the save of" in ui.save_answer("retry")
    answer = json.loads((Path(record.folder) / SAVE_ANSWER_FILE).read_text())
    assert answer == {"id": "q1", "action": "retry"}  # no path: the worker retries its own
    assert "rescue folder" in ui.save_answer("rescue")
    assert json.loads((Path(record.folder) / SAVE_ANSWER_FILE).read_text())["action"] == "rescue"
    for bad in ("/etc/passwd", "../x", "", None):
        with pytest.raises(JobError, match="unknown answer"):
            ui.save_answer(bad)

    (Path(record.folder) / SAVE_QUESTION_FILE).unlink()  # the worker took the answer
    box, text, session = ui.poll_save(session)
    assert box["visible"] is False and "waiting" not in ui.poll({})[0]
    ask_the_ui(record, id="q2", path=7)  # a malformed question is no question
    assert ui.poll_save(session)[:2] == (SKIP, SKIP)


def test_a_question_of_a_job_that_ended_is_not_shown(waiting_ui):
    ui, record = waiting_ui
    ask_the_ui(record)
    assert ui.poll_save({})[0]["visible"] is True
    ui.runner.kill(record)
    wait_for(lambda: not ui.runner.is_running(record), what="the worker's end")
    box, _, _ = ui.poll_save({"question": "q1"})
    assert box["visible"] is False
    with pytest.raises(JobError):
        ui.save_answer("retry")


def test_an_adapter_rescued_outside_the_workspace_is_named_and_never_served(ws, tmp_path):
    rescued = write(tmp_path / "rescue" / "full-20260101-000000.safetensors", b"weights")
    out, folder = ws.outputs, ws.jobs / "20260101-000000-aaaaaa"
    events = [{"event": "start", "config": {"train": {"max_steps": 2}}},
              {"event": "step", "step": 2, "total": 2, "loss": 0.5},
              {"event": "save_failed", "step": 2, "path": str(out / "full.safetensors"), "final": True,
               "error": "No space left on device", "needed_bytes": 12_000_000, "free_bytes": 0,
               "next_path": str(rescued)},
              {"event": "save", "step": 2, "path": str(rescued), "check_ok": True},
              {"event": "done", "step": 2, "output": str(rescued)}]
    write(out / "events.jsonl", "".join(json.dumps(event) + "\n" for event in events))
    write(folder / "job.json", json.dumps({"id": folder.name, "folder": str(folder), "config_path": "",
                                           "output_dir": str(out), "output_name": "full", "started": time.time()}))
    write(folder / "exit.json", json.dumps({"ok": True}))
    write(ws.jobs / "current.json", json.dumps({"id": folder.name}))
    ui = RankwrightUI(ws, runner=JobRunner(ws.jobs), preset_dirs=[])
    status, _, _, _, log_text, files, _, choices, _, _ = ui.poll({})
    assert f"saved outside the workspace, to `{rescued}`" in status and "does not serve it" in status
    assert f"writing it to {rescued} instead" in log_text
    assert files is None and choices["choices"] == [] and not ui.servable([str(rescued)])


# ====================================================================================== the real worker
SITECUSTOMIZE = '''
"""Test only: the worker's adapter files fail as on a full disk while {flag} exists."""
import errno, os
from pathlib import Path

import methods.files

_write = methods.files.atomic_write_bytes


def full_disk(path, data, overwrite=True):
    if Path(path).suffix == ".safetensors" and os.path.exists({flag!r}):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _write(path, data, overwrite=overwrite)


methods.files.atomic_write_bytes = full_disk
'''


@pytest.mark.slow
def test_a_full_disk_at_the_final_save_asks_the_ui_and_retry_writes_into_outputs(ws, tiny_pipeline, tmp_path,
                                                                                 monkeypatch):
    """The real worker (python -m ui.worker), its adapter writes failing with ENOSPC (a sitecustomize on the
    worker's PYTHONPATH, only here); the UI shows the wait, the disk frees up, "Retry save" writes into outputs/."""
    flag = write(tmp_path / "disk-full", "")
    hooks = write(tmp_path / "hooks" / "sitecustomize.py", SITECUSTOMIZE.format(flag=str(flag))).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RANKWRIGHT_RESCUE_DIR", str(tmp_path / "rescue"))
    ui, values = real_worker_ui(ws, tiny_pipeline("sd1"), tmp_path, **{"train.max_steps": 2, "output.name": "full"})
    ui.start(*ui.ordered(values))
    record = ui.runner.current()
    try:
        def asked():
            view = ui.runner.view(record)
            assert not view.finished, "\n".join(view.log)
            return ui.poll_save({})[1]

        text = wait_for(asked, timeout=300, what="the save question")
        output = ws.outputs / "full.safetensors"
        assert f"Writing `{output}` failed at step 2: **No space left on device**" in text and " MB**" in text
        assert "waiting for your answer" in ui.poll({})[0]
        time.sleep(1.0)
        assert ui.runner.is_running(record) and not output.exists()  # it waits, the weights in memory
        flag.unlink()  # the user freed some space
        ui.save_answer("retry")
        deadline = time.time() + 120
        while not (view := ui.runner.view(record)).finished:
            assert time.time() < deadline, "\n".join(view.log)
            time.sleep(0.2)
    finally:
        ui.runner.kill(record)
    assert view.status == "done", "\n".join(view.log)
    assert Path(view.output) == output and output.is_file() and not (tmp_path / "rescue").exists()
    assert any(f"could not write {output} at step 2 (No space left on device" in line and
               "trying the same path again" in line for line in view.log)
    assert ui.poll_save({})[0]["visible"] is False and ui.servable([str(output)])
    assert not list(Path(record.folder).glob("save_*.json"))
