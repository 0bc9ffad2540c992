"""The app keeps no one's photos: each answer's files (uploads, and previews made for them) are deleted a short
while after the answer, once the browser has had time to fetch the gallery's images.

Only files inside the app's temp folder are ever deleted (a caller's own paths never are), and not those that
`keep` names (the example photos' cached copies).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable


class Forgetter:
    """Deletes files `after` seconds after `later` is given them, on one background thread."""

    def __init__(self, root: str | Path, after: float, keep: Callable[[], set[str]] = set):
        self.root = Path(root).resolve()
        self.after = after
        self.keep = keep
        # The last files deleted (for tests; bounded, as a server runs for days) and how many in all.
        self.forgotten: deque[str] = deque(maxlen=1000)
        self.count = 0
        self._due: deque[tuple[float, float, list[str]]] = deque()  # (deadline, answered at, paths), in order
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def later(self, paths: Iterable[str]) -> None:
        """Delete these files `after` seconds from now (those outside the temp folder are left alone)."""
        mine = [str(Path(p).resolve()) for p in paths if self.owns(p)]
        if not mine:
            return
        with self._changed:
            self._due.append((time.monotonic() + self.after, time.time(), mine))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="captioner-forget", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def owns(self, path) -> bool:
        resolved = Path(path).resolve()
        return resolved != self.root and resolved.is_relative_to(self.root)

    def wait_until_done(self, timeout: float | None = None) -> bool:
        """True once every file handed over has been dealt with (False after `timeout` seconds)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._due, timeout)

    def _run(self) -> None:
        with self._changed:
            while True:
                if not self._due:
                    self._changed.wait()
                    continue
                deadline, answered, paths = self._due[0]
                if deadline > time.monotonic():
                    self._changed.wait(deadline - time.monotonic())
                    continue
                self._delete(paths, answered)
                self._due.popleft()
                self._changed.notify_all()

    def _delete(self, paths: list[str], answered: float) -> None:
        kept = {str(Path(p).resolve()) for p in self.keep()}
        for path in paths:
            if path in kept:
                continue
            try:
                # Uploaded again since this answer (an upload's path is its content's hash): a later request's
                # file now, which that request forgets in its turn.
                if os.stat(path).st_mtime > answered:
                    continue
                os.remove(path)
            except FileNotFoundError:
                continue
            self.forgotten.append(path)
            self.count += 1
            parent = Path(path).parent
            if parent != self.root:
                try:
                    parent.rmdir()  # Gradio's per-upload folder, once empty
                except OSError:
                    pass
