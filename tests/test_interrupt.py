"""Ctrl-C (SIGINT) ends `wid distill` with one line that says how to resume, exit status 130, the lock released
and only complete checkpoints left; resuming as told finishes the run."""
import os
import signal
import subprocess
import sys
import time

from wid.run_folder import LOCK_NAME, missing_for_resume

from distill_fixtures import distill_argv, write_corpus, write_teacher


def test_sigint_says_how_to_resume_and_the_advice_works(tmp_path):
    teacher, corpus, out = write_teacher(tmp_path / "teacher"), write_corpus(tmp_path / "corpus.txt"), tmp_path / "out"
    argv = distill_argv(teacher, corpus, out)
    argv[argv.index("--max_steps") + 1], argv[argv.index("--save_steps") + 1] = "100000", "5"
    command = [sys.executable, "-m", "wid.cli", "distill", *argv]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("checkpoint-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("wid ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted; resume with the same command plus --resume_from_checkpoint" in lines[0]
    checkpoint = lines[0].rsplit(" ", 1)[1]
    assert not (out / LOCK_NAME).exists()
    assert all(not missing_for_resume(p) for p in (out / "checkpoints").glob("checkpoint-*"))
    step = int(checkpoint.rsplit("-", 1)[1])
    argv[argv.index("--max_steps") + 1] = str(step + 3)
    resumed = subprocess.run([*command[:4], *argv, "--resume_from_checkpoint", checkpoint], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "wid_summary.json").exists()
