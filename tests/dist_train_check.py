"""Run under `accelerate launch` by tests/test_train.py and tests/test_distributed.py: train, then each
rank writes a digest of its weights (``rank<R>.txt``) and what its run returned (``rank<R>.json``).
Before training, each rank writes its process id to ``pid<R>`` (for tests that signal one rank)."""

import hashlib
import json
import os
import sys
from pathlib import Path

from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
(out / f"pid{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
trainer = Trainer(resolve_config(None, sys.argv[2:]))
result = trainer.train()
acc = trainer.accelerator
model = acc.unwrap_model(trainer.model)
h = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().float().cpu().numpy().tobytes())
(out / f"rank{acc.process_index}.txt").write_text(h.hexdigest())
(out / f"rank{acc.process_index}.json").write_text(json.dumps({
    "num_processes": acc.num_processes, "step": result["step"], "interrupted": bool(result.get("interrupted")),
    "stopped_early": result.get("stopped_early"), "fp16_skipped": trainer.fp16_skipped}))
