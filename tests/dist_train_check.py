"""Run under `accelerate launch` by tests/test_train.py: train, then each rank writes a digest of its weights."""

import hashlib
import json
import sys
from pathlib import Path

from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer

out = Path(sys.argv[1])
trainer = Trainer(resolve_config(None, sys.argv[2:]))
result = trainer.train()
acc = trainer.accelerator
model = acc.unwrap_model(trainer.model)
h = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().float().cpu().numpy().tobytes())
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{acc.process_index}.txt").write_text(h.hexdigest())
(out / f"rank{acc.process_index}.json").write_text(json.dumps({"num_processes": acc.num_processes,
                                                                "step": result["step"]}))
