"""The lab's reader of helper processes' lines does not lose a line that arrived together with
the one before it (the flake ``select()`` + buffered ``readline()`` caused in test_dns_fairness)."""

import os
import subprocess
import sys

from tests.lab.childlines import ChildLines


def test_two_lines_written_at_once_are_both_returned():
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b'{"opened": 300}\n{"alive": 16}\n')
        with os.fdopen(read_end, "rb", closefd=False) as stream:
            lines = ChildLines(stream)
            assert lines.json(1) == {"opened": 300}
            assert lines.json(0.2) == {"alive": 16}
            assert lines.readline(0.05) is None
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_buffered_pattern_it_replaces_does_lose_the_second_line():
    """Why the reader exists: after a buffered readline() the pipe's descriptor is not readable
    although the second line is waiting in Python's buffer."""
    import select

    # One write(2) of both lines (atomic on a pipe), as a child's flush of its buffer is.
    proc = subprocess.Popen([sys.executable, "-c", "import os, time; os.write(1, b'a\\nb\\n'); time.sleep(5)"],
                            stdout=subprocess.PIPE)
    try:
        assert select.select([proc.stdout], [], [], 5)[0]
        assert proc.stdout.readline() == b"a\n"
        assert select.select([proc.stdout], [], [], 0.2)[0] == []
    finally:
        proc.kill()
        proc.wait()


def test_partial_line_waits_then_completes_and_eof_ends():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdout.write('par'); sys.stdout.flush(); time.sleep(0.3); print('tial')"],
        stdout=subprocess.PIPE,
    )
    try:
        lines = ChildLines(proc.stdout)
        assert lines.readline(0.05) is None  # only "par" so far: not a line yet
        assert lines.readline(5) == "partial"
        assert lines.readline(5) is None  # the child exited: end of file
    finally:
        proc.kill()
        proc.wait()


def test_json_names_the_timeout_and_exit_status():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE)
    proc.wait()
    try:
        ChildLines(proc.stdout).json(0.5, proc)
    except AssertionError as e:
        assert "within 0.5s (exit 0)" in str(e)
    else:
        raise AssertionError("no AssertionError")
