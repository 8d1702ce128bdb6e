"""A worker process spoken to one request line at a time, for the benchmark drivers.

Each library runs in its own process (run.py's fits, inference.py's inference tasks);
the driver writes one request per line and reads answers from lines that start with
``@@ `` (JSON), which keeps the libraries' own printing out of the protocol.
"""
import json
import os
import queue
import signal
import subprocess
import threading


class WorkerDied(Exception):
    pass


class LineWorker:
    """The process ``cmd`` (cwd ``cwd``, stderr appended to ``log``); the first answer,
    its hello, is awaited for ``hello_timeout`` seconds."""

    quit_line = json.dumps({"op": "quit"})

    def __init__(self, lib, cmd, env, cwd, log, hello_timeout):
        self.lib = lib
        self.errlog = open(log, "a")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errlog, text=True, env=env, cwd=str(cwd),
                                     start_new_session=True, bufsize=1)
        self.q = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        self.hello = self._read(hello_timeout)

    def _reader(self):
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self.q.put(json.loads(line[3:]))
        self.q.put(None)

    def _read(self, timeout):
        try:
            msg = self.q.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise TimeoutError(f"{self.lib}: no answer in {timeout:g} s")
        if msg is None:
            raise WorkerDied(f"{self.lib} worker exited (code {self.proc.poll()})")
        return msg

    def request_line(self, line, timeout):
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(f"{self.lib} worker is gone")
        return self._read(timeout)

    def close(self, timeout=10):
        try:
            self.proc.stdin.write(self.quit_line + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=timeout)
        except Exception:
            self.kill()
        self.errlog.close()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
