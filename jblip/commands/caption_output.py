"""The JSONL file `jblip caption --out` appends to: checked whole, locked, then resumed.

A caption file holds one `{"image": absolute path, "caption": text}` object per
line. Before anything is written the whole existing file is read and checked;
a file that is not such a file (binary, another format, a text file without a
trailing newline) is refused untouched. Only a last line that is the start of
a caption record (a run killed mid-write) is cut off. The file stays locked
(an exclusive, non-blocking `flock`) while a run appends to it, so a second
`caption` on the same output stops at once instead of writing every image twice.
"""
from __future__ import annotations

import json
import os
import stat
import sys

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer is the user's business there
    fcntl = None

RECORD_START = b'{"image": "'  # how every record this command writes begins


def image_key(path: str) -> str:
    """How an image is recorded and matched: its resolved absolute path (symlinks followed), so a
    rerun from another folder, or through another link, finds the images it already captioned."""
    return os.path.normcase(os.path.realpath(path))


def _is_record(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("image"), str) and isinstance(value.get("caption"), str)


def _looks_cut(fragment: bytes) -> bool:
    """True for the start of a record this command writes (a write cut short)."""
    n = min(len(fragment), len(RECORD_START))
    return fragment[:n] == RECORD_START[:n] and b"\n" not in fragment


def check_records(data: bytes, out: str) -> tuple[set[str], int]:
    """-> (keys of the images in `data`, how many bytes to keep). Raises ValueError, naming the line,
    when `data` is not a caption file; nothing is changed here."""
    if not data:
        return set(), 0
    complete = data.rfind(b"\n") + 1
    body, tail = data[:complete], data[complete:]
    if tail:
        try:
            if _is_record(json.loads(tail.decode("utf-8"))):  # a whole record without its newline
                body, tail, complete = data, b"", len(data)
        except ValueError:
            pass
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{out} is not a jblip caption file (not UTF-8 text); it was left untouched: "
                         "choose another --out") from None
    done = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not _is_record(record):
            raise ValueError(f"{out} line {number} is not a jblip caption record ({line[:60]!r}); it was left "
                             "untouched: fix or remove that line, or choose another --out")
        done.add(image_key(record["image"]))
    if tail and not _looks_cut(tail):
        number = text.count("\n") + 1
        raise ValueError(f"{out} line {number} is not a jblip caption record ({tail[:60]!r}, no newline); it was "
                         "left untouched: fix or remove that line, or choose another --out")
    return done, complete


def read_done(path: str) -> set[str]:
    """Keys of the images in the caption file at `path` (empty when it does not exist), read only."""
    try:
        with open(path, "rb") as f:
            return check_records(f.read(), path)[0]
    except FileNotFoundError:
        return set()


def read_records(path: str) -> list[dict]:
    """The whole records of the caption file at `path` (a cut last line left out), read only."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    _, keep = check_records(data, path)
    return [json.loads(line) for line in data[:keep].decode("utf-8").splitlines() if line.strip()]


class CaptionOutput:
    """`with CaptionOutput(path) as out:` -> `out.done` (keys already captioned), `out.write(records)`.

    Opening checks the file (see the module docstring), takes the lock and only then cuts an
    interrupted last record; a file that is refused is not modified and not locked."""

    def __init__(self, path: str):
        self.path = path
        self._file = None
        self.done: set[str] = set()

    def __enter__(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ValueError(f"--out {self.path} is not a regular file")
        if st is not None:
            with open(self.path, "rb") as f:
                check_records(f.read(), self.path)  # refuse before creating, locking or cutting anything
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "a+b")
        try:
            self._lock()
            self._file.seek(0)
            data = self._file.read()
            self.done, keep = check_records(data, self.path)  # again, now that no one else can write
            if keep < len(data):
                self._file.truncate(keep)
                print(f"caption: dropped an incomplete last line of {self.path} (interrupted write)",
                      file=sys.stderr)
            elif data and not data.endswith(b"\n"):
                self._file.write(b"\n")  # a whole last record that lost only its newline
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self):
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another process is writing to {self.path} (it is locked); wait for it to finish "
                             "or choose another --out") from None

    def write(self, records) -> None:
        """Append (image key, caption) pairs as whole lines, on disk before this returns."""
        lines = "".join(json.dumps({"image": key, "caption": caption}, ensure_ascii=False) + "\n"
                        for key, caption in records)
        self._file.write(lines.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None

    def __exit__(self, *exc):
        self.close()


class CaptionFiles:
    """The caption file as a `jblip.commands.process_outputs` store: records are (image, caption)."""
    open = CaptionOutput
    read_done = staticmethod(read_done)
    remove = staticmethod(os.remove)

    @staticmethod
    def read_records(path: str) -> list[tuple[str, str]]:
        return [(r["image"], r["caption"]) for r in read_records(path)]

    @staticmethod
    def key(record) -> str:
        return image_key(record[0])
