"""The output of a batch job (`caption`, `index`) run by one process or by several joined with
`jax.distributed`, resumable and merged exactly once per input.

On one process the job appends to OUT. On N processes, process i appends to its own part,
`OUT.p<i>of<N>` (a file or a folder, whatever OUT is), and when every process is done,
process 0 moves the records of the parts that OUT lacks into OUT (in the inputs' order) and
removes the parts. `done` (what a run skips) is everything in OUT or in any part, of any
process count, so a run interrupted anywhere (a process killed mid-write, or between the
move and the removal) resumes with any process count, without duplicates or losses.

A store says how to handle one kind of output:
  open(path)          -> a context manager with `done` (keys already there) and `write(records)`
  read_done(path)     -> the keys at path, read only (empty when there is nothing)
  read_records(path)  -> the records at path, read only, in the form `write` takes
  key(record)         -> the record's key (what `done` holds)
  remove(path)        -> delete a merged part
"""
from __future__ import annotations

import glob

MERGE_CHUNK = 1024  # records moved into OUT per write (an index part may be larger than memory)


def part_path(out: str, index: int, count: int) -> str:
    return f"{out}.p{index}of{count}"


def part_files(out: str) -> list[str]:
    """Every process's part of OUT, whatever the process count of the run that wrote it."""
    return sorted(glob.glob(glob.escape(out) + ".p*of*"))


class ProcessOutputs:
    """`with ProcessOutputs(OUT, hosts, store, "caption") as out:` -> `out.done`, `out.write(records)`,
    and `out.merge(order)` once the job is done (every process calls it)."""

    def __init__(self, path: str, hosts, store, name: str):
        self.path, self.hosts, self.store, self.name = path, hosts, store, name
        self.main = store.open(path) if hosts.index == 0 else None
        self.part = store.open(part_path(path, hosts.index, hosts.count)) if hosts.count > 1 else None

    def __enter__(self):
        try:
            for output in filter(None, (self.main, self.part)):
                output.__enter__()
        except BaseException:
            self.__exit__()
            raise
        self.hosts.barrier(f"jblip-{self.name}-opened")  # each part checked (a cut last record dropped) by its owner
        self.done = set(self.main.done) if self.main else self.store.read_done(self.path)
        for part in part_files(self.path):
            self.done |= self.store.read_done(part)
        self.hosts.barrier(f"jblip-{self.name}-read")  # nobody writes before everybody has read
        return self

    def write(self, records):
        (self.part or self.main).write(records)

    def merge(self, order=None):
        """Process 0 moves the parts' records that OUT lacks into OUT (sorted by their key's place in
        `order`, when given), then removes the parts; also after a one-process run, for the parts
        an earlier run on several processes left."""
        self.hosts.barrier(f"jblip-{self.name}-written")
        parts = part_files(self.path) if self.main is not None else []
        if parts:
            have = self.store.read_done(self.path)
            new = {}
            for part in parts:
                for record in self.store.read_records(part):
                    key = self.store.key(record)
                    if key not in have:
                        new.setdefault(key, record)
            keys = list(new)
            if order is not None:
                place = {k: i for i, k in enumerate(order)}
                keys.sort(key=lambda k: place.get(k, len(place)))
            for start in range(0, len(keys), MERGE_CHUNK):
                self.main.write([new[k] for k in keys[start:start + MERGE_CHUNK]])
            for part in parts:
                self.store.remove(part)
        self.hosts.barrier(f"jblip-{self.name}-merged")

    def __exit__(self, *exc):
        for output in filter(None, (self.part, self.main)):
            output.close()
