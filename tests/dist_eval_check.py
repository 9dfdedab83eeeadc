"""Run by tests/test_distributed.py, once as a plain process and once under `accelerate launch` with two:
the trainer's evaluation (the one its dev and test evaluations use) of a freshly built model (same seed,
so the same weights) over the test split, then each rank writes what it measured: ``metrics<R>.json``,
``examples<R>.jsonl`` (per-example results) and ``bad<R>.json`` (the run's bad-record summary)."""

import json
import sys
from pathlib import Path

from rahf.eval.evaluate import write_metrics
from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer, make_loader

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
trainer = Trainer(resolve_config(None, sys.argv[2:]))
trainer.build()
trainer.step = trainer.epoch = 0
cfg, acc = trainer.cfg, trainer.accelerator
test = trainer.open_split(cfg.data.test_split, stored_maps=True)
loader = acc.prepare(make_loader(test, trainer.collate, cfg.eval.batch_size, cfg))
ev = trainer.evaluate(loader, cfg.data.test_split, examples=True)
rank = acc.process_index
write_metrics(out / f"metrics{rank}.json", ev.metrics, ev.unavailable, {"num_processes": acc.num_processes})
with open(out / f"examples{rank}.jsonl", "w", encoding="utf-8") as f:
    for rec in ev.examples.records():
        f.write(json.dumps(rec) + "\n")
(out / f"bad{rank}.json").write_text(json.dumps(trainer.bad.summary()))
acc.wait_for_everyone()
acc.end_training()
