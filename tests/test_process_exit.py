"""How a command's process ends (`commands.run_as_process`): the exit code of its main, its
output delivered, atexit work done and running threads waited for, though the interpreter's
own teardown is skipped."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO


def _run(body: str, tmp_path):
    code = textwrap.dedent(
        """
        import atexit, sys, threading, time
        from megatron_danube.commands import run_as_process
        OUT = sys.argv[1]
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        # stdout block-buffered into the pipe, as a command's output usually is
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("returned, code", [("0", 0), ("None", 0), ("2", 2)])
def test_the_exit_code_is_mains_and_piped_output_arrives(tmp_path, returned, code):
    proc = _run(
        f"""
        def main():
            print("result line")  # block-buffered: stdout is a pipe here
            sys.stderr.write("diagnostic")
            return {returned}
        run_as_process(main)
        """,
        tmp_path,
    )
    assert proc.returncode == code
    assert proc.stdout == "result line\n" and proc.stderr == "diagnostic"


def test_sys_exit_with_a_message_prints_it_and_exits_1(tmp_path):
    proc = _run("run_as_process(lambda: sys.exit('bad input: fix it'))", tmp_path)
    assert proc.returncode == 1 and proc.stderr == "bad input: fix it\n"


def test_atexit_work_runs(tmp_path):
    proc = _run(
        """
        def main():
            atexit.register(lambda: open(OUT + "/atexit", "w").write("ran"))
        run_as_process(main)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "atexit").read_text() == "ran"


def test_running_threads_finish(tmp_path):
    proc = _run(
        """
        def main():
            def late():
                time.sleep(0.5)
                open(OUT + "/thread", "w").write("done")
            threading.Thread(target=late).start()
            return 0
        run_as_process(main)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "thread").read_text() == "done"


def test_an_uncaught_exception_keeps_its_traceback(tmp_path):
    proc = _run("run_as_process(lambda: 1 / 0)", tmp_path)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr
