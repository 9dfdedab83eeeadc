"""Resume with randomness on: with dropout in T5 and stochastic depth in the ViT, a run paused and resumed
ends with exactly the weights of an uninterrupted one, because the checkpoint restores the RNG states.

The tiny preset has no dropout, so the resume tests of test_train.py and test_reliability.py cannot see
a lost RNG state; here each training step draws dropout masks from the global torch RNG. The test also
checks that it can see one: a resume from the same checkpoint with another RNG state in it ends with
other weights. (The synth pipeline has no data augmentation; the data order comes from a generator
seeded by (seed, epoch), not from the global RNG.)"""

from __future__ import annotations

import shutil

import pytest
import torch

from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer

from test_train import weights_digest

RANDOM = ["model.text.dropout_rate=0.2", "model.vision.drop_path_rate=0.2"]


def args(data, out, name, *extra):
    # batch 16 of 64 records: 4 steps an epoch, so the run crosses an epoch boundary after the pause
    return [f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", "tracking.tracker=none",
            "data.num_workers=0", "data.generate_synth=false", "data.eval_split=no_eval", "model.vision.img_size=64",
            "model.vision.depth=1", "model.text.num_layers=1", "model.text.num_decoder_layers=1", *RANDOM,
            "train.batch_size=16", "train.threads=1", "train.deterministic=true", "train.max_steps=6",
            "optim.warmup_steps=2", "optim.lr=5e-3", "eval.every=0", "eval.test_at_end=false", "checkpoint.every=3",
            "checkpoint.keep_last=5", *extra]


def run(data, out, name, *extra, resume=None):
    return Trainer(resolve_config(None, args(data, out, name, *extra)), resume=resume).train()


@pytest.mark.slow
def test_resume_with_dropout_and_drop_path_gives_identical_weights(synth_root, tmp_path):
    cfg = resolve_config(None, args(synth_root, tmp_path, "x"))
    assert cfg.model.text.dropout_rate > 0 and cfg.model.vision.drop_path_rate > 0

    assert run(synth_root, tmp_path, "straight")["step"] == 6
    straight = weights_digest(tmp_path / "straight/checkpoints/step_000006/model.safetensors")

    paused = run(synth_root, tmp_path, "pieces", "train.stop_after_steps=2")
    assert paused == {"interrupted": True, "step": 2}
    torch.manual_seed(999)  # whatever the process's RNG holds now must not matter
    assert run(synth_root, tmp_path, "pieces", resume="latest")["step"] == 6
    assert weights_digest(tmp_path / "pieces/checkpoints/step_000006/model.safetensors") == straight

    # the same resume with another RNG state in the checkpoint ends elsewhere: the randomness is live
    ckpt = tmp_path / "other_rng" / "checkpoints" / "step_000003"
    shutil.copytree(tmp_path / "straight/checkpoints/step_000003", ckpt)
    states = torch.load(ckpt / "rng_0.pt", weights_only=True)
    states["torch"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(states, ckpt / "rng_0.pt")
    assert run(synth_root, tmp_path, "other_rng", resume=str(ckpt))["step"] == 6
    assert weights_digest(tmp_path / "other_rng/checkpoints/step_000006/model.safetensors") != straight
