"""Child processes that announce themselves with one JSON line on stdout: the targets,
synthetic prefill processes and workers that tests, benchmarks and demos start. Every
wait is bounded; a child that does not stop is killed."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading


class ChildError(RuntimeError):
    """A child process did not start, or printed something other than its JSON line."""


def start_child(cmd: list[str], timeout: float, what: str = "child",
                env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """Starts ``cmd`` with stdin and stdout piped and returns it with the JSON line it
    prints first (a target's hello, a worker's ready line), waiting at
    most ``timeout`` seconds. A child that fails to start is killed. ``env``: variables
    set for the child on top of this process's environment."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env} if env else None)
    box: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: box.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = box.get(timeout=timeout)
        if not line:
            raise ChildError(f"{what} exited (status {proc.wait(timeout=5)}) before printing its JSON line")
        return proc, json.loads(line)
    except queue.Empty:
        proc.kill()
        proc.wait(timeout=5)
        raise ChildError(f"{what} printed nothing in {timeout} s") from None
    except json.JSONDecodeError:
        stop_child(proc)
        raise ChildError(f"{what} printed {line.strip()!r}, not its JSON line") from None


def stop_child(proc: subprocess.Popen, timeout: float = 10.0, sig: int | None = None) -> bool:
    """End of stdin (what a target or a synthetic prefill exits on) — or, with ``sig``, that signal by pid
    (for children that do not read stdin) — then a bounded wait, then kill; the pipes
    are closed either way. Returns False when the child had to be killed."""
    if sig is None:
        _close(proc.stdin)
    elif proc.poll() is None:
        proc.send_signal(sig)
    stopped = True
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stopped = False
        proc.kill()
        proc.wait(timeout=timeout)
    _close(proc.stdin)
    _close(proc.stdout)
    return stopped


def _close(pipe) -> None:
    try:
        if pipe:
            pipe.close()
    except OSError:  # a flush into a child that is gone
        pass
