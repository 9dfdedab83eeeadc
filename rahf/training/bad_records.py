"""Bad-record accounting of a training run (``data.on_bad_record=skip``).

A skipped record is never silent: it is appended once to ``RUN/bad_records.jsonl`` when first met
(split, uid, where, problem, stage ``manifest``/``load``, step, epoch), counted per split (a record met
again in a later epoch counts once), listed at the end of the epoch that met it and in the run's
summary, and checked against ``data.max_bad_fraction`` of the split's records: more stops the run with
a :class:`~rahf.schema.DataError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from ..schema import DataError

SHOW = 20  # records listed per report; the rest are counted


class BadRecords:
    """The bad records of one run, across processes.

    ``accelerator``: gathers the records every process met (collective when several) and prints on
    the main process. ``log``: appends a record to the run's ``metrics.jsonl``. ``skip``: whether
    ``data.on_bad_record`` is ``skip`` (otherwise a bad record raises where it is met and nothing is
    counted here). ``keep_existing``: a resumed run continues the file and the counts it holds.
    """

    def __init__(self, path: Path, max_fraction: float, *, accelerator, log: Callable[[dict], None], skip: bool,
                 keep_existing: bool):
        self.path, self.max_fraction, self.skip = Path(path), max_fraction, skip
        self.accelerator, self.log = accelerator, log
        self.write = accelerator.is_main_process
        self.known: dict[str, dict[str, str]] = {}  # split -> key -> problem
        self.totals: dict[str, int] = {}
        self.epoch_seen: dict[str, dict[str, str]] = {}  # met during the current epoch (listed at its end)
        self.pending: list[dict] = []  # met in training batches since the last optimizer step
        if self.write and not keep_existing and self.path.exists():
            self.path.unlink()
        if keep_existing and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    self.known.setdefault(r["split"], {})[self._key(r)] = r["problem"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def _key(r: dict) -> str:
        return str(r.get("where") or r.get("uid"))

    # ---- the store
    def add(self, split: str, records: list[dict], stage: str, step: int, epoch: int) -> list[dict]:
        """Count ``records`` (dicts with ``uid``, ``where``, ``problem``); returns those met for the first time."""
        known = self.known.setdefault(split, {})
        seen = self.epoch_seen.setdefault(split, {})
        new = []
        for r in records:
            k = self._key(r)
            seen[k] = f"{r.get('uid') or r.get('where')}: {r['problem']}"
            if k in known:
                continue
            known[k] = r["problem"]
            new.append({"split": split, "uid": r.get("uid"), "where": r.get("where"), "problem": r["problem"],
                        "stage": stage, "step": step, "epoch": epoch})
        if new and self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                for r in new:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return new

    def count(self, split: str) -> int:
        return len(self.known.get(split, {}))

    def check(self, split: str) -> None:
        """Raise :class:`DataError` when more than ``max_fraction`` of the split's records are known bad."""
        n, total = self.count(split), self.totals.get(split, 0)
        if total and n > self.max_fraction * total:
            raise DataError(None, f"{n} of {total} records are bad ({n / total:.1%}), more than "
                                  f"data.max_bad_fraction={self.max_fraction:g} allows; they are listed in {self.path}. "
                                  f"Fix the data (`rahf data validate` lists every problem) or raise the limit",
                            f"split {split!r}")

    def take_epoch(self, split: str) -> dict[str, str]:
        return self.epoch_seen.pop(split, {})

    def summary(self) -> dict[str, dict[str, int]]:
        """``{split: {"bad": n, "total": records}}`` of the splits with bad records."""
        return {s: {"bad": self.count(s), "total": self.totals.get(s, 0)} for s in sorted(self.known) if self.count(s)}

    # ---- where records are met
    def opened(self, split: str, ds) -> None:
        """A split was opened (:func:`rahf.data.format.open_dataset`): count its records and the
        manifest-level bad ones, and list those."""
        self.totals[split] = ds.total
        if not ds.bad:
            return
        self.add(split, [{"uid": e.uid, "where": e.where, "problem": e.problem} for e in ds.bad], "manifest", 0, 0)
        self.take_epoch(split)
        self._print(f"{split}: skipping {len(ds.bad)} of {ds.total} manifest record(s) (data.on_bad_record=skip), "
                    f"listed in {self.path}:", [str(e) for e in ds.bad])
        self.check(split)

    def loaded(self, split: str, records: list[dict], step: int, epoch: int, *, gathered: bool = False) -> None:
        """Records skipped while loading (``batch["bad_records"]``). Unless ``gathered``, every
        process's records are collected first, a collective operation when there are several."""
        if not self.skip:
            return
        if not gathered and self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            records = [r for part in gather_object([records]) for r in part]
        if records:
            self.add(split, records, "load", step, epoch)
            self.check(split)

    def take_pending(self) -> list[dict]:
        pending, self.pending = self.pending, []
        return pending

    # ---- reports
    def end_epoch(self, split: str, step: int, epoch: int) -> None:
        """List the records skipped during the epoch (or evaluation) that just ended, and log their number."""
        seen = self.take_epoch(split)
        if not seen:
            return
        self._print(f"epoch {epoch}: skipped {len(seen)} bad record(s) of split {split!r} ({self.count(split)} of "
                    f"{self.totals.get(split, '?')} so far, listed in {self.path}):", seen.values())
        self.log({"split": split, "step": step, "epoch": epoch, "bad_records_skipped": len(seen)})

    def print_summary(self) -> None:
        summ = self.summary()
        if summ:
            self.accelerator.print("bad records skipped (data.on_bad_record=skip): " + ", ".join(
                f"{s} {v['bad']} of {v['total']}" for s, v in summ.items()) + f"; listed in {self.path}")

    def _print(self, head: str, lines: Iterable[str]) -> None:
        lines = list(lines)
        self.accelerator.print(head)
        for line in lines[:SHOW]:
            self.accelerator.print(f"  {line}")
        if len(lines) > SHOW:
            self.accelerator.print(f"  ... and {len(lines) - SHOW} more")

