"""Lines from a helper process's stdout, each within a timeout.

``select()`` on ``proc.stdout`` and then ``proc.stdout.readline()`` loses lines: when a child
writes two lines close together, the first ``readline()`` reads both into Python's buffer and
the next ``select()`` on the descriptor waits for data that already arrived (a test then fails
with "no line within N s" although the line was printed). This reader reads the raw descriptor
itself and keeps its own buffer, so a line is returned as soon as it is complete.
"""

import json
import os
import select
import time


class ChildLines:
    """``readline(timeout)`` over a child's pipe; use it for every read of that pipe."""

    def __init__(self, stream):
        self._fd = stream.fileno()
        self._buffer = b""
        self._eof = False

    def readline(self, timeout):
        """The next line (``str``, without its newline), or ``None`` at timeout or end of file."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer and not self._eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return None
            chunk = os.read(self._fd, 65536)
            self._eof = not chunk
            self._buffer += chunk
        if b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
        elif self._buffer:
            line, self._buffer = self._buffer, b""
        else:
            return None
        return line.decode("utf-8", "replace")

    def json(self, timeout, proc=None):
        """The next line as JSON; AssertionError naming the timeout (and ``proc``'s exit) if none."""
        line = self.readline(timeout)
        if line is None:
            exit_status = proc.poll() if proc is not None else None
            raise AssertionError("no line from the helper within %gs (exit %s)" % (timeout, exit_status))
        return json.loads(line)
