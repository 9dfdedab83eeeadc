"""The run directory's logs: ``run_info.json``, ``metrics.jsonl`` (train and evaluation records) and
``steps.jsonl`` (one line per optimizer step: step, epoch, the uids of its batches). Only the main
process writes; on the others every method is a no-op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch


def git_commit() -> Optional[str]:
    """The package's git commit, when it runs from a git checkout."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


class RunLog:
    def __init__(self, run_dir: Path, main_process: bool):
        self.dir, self.main = Path(run_dir), main_process

    def write_info(self, **extra) -> None:
        """``run_info.json``: commit, command line, torch version, start time and ``extra``."""
        if self.main:
            info = {"git_commit": git_commit(), "argv": sys.argv, **extra, "torch": torch.__version__,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (self.dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")

    def metrics(self, record: dict) -> None:
        """Append one record to ``metrics.jsonl``."""
        if self.main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step: int, epoch: int, uids: list[str]) -> None:
        """Append an optimizer step's line to ``steps.jsonl``."""
        if self.main:
            with open(self.dir / "steps.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "uids": uids}) + "\n")

    def truncate_steps(self, step: int) -> int:
        """Keep ``steps.jsonl`` lines up to ``step`` (a resumed run redoes the later ones); returns how
        many lines were dropped (a line cut short by a kill is dropped too)."""
        path = self.dir / "steps.jsonl"
        if not self.main or not path.is_file():
            return 0
        keep, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                ok = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, path)
        return dropped
