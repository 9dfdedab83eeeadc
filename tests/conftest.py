import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synth dataset shared by the tests (64 train / 16 dev / 16 test at 128 px)."""
    from rahf.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, train=64, dev=16, test=16, size=128, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def small_synth_root(tmp_path_factory):
    """A smaller synth dataset at 64 px (32 train / 8 dev / 8 test) for trainer runs that must stay fast
    (multi-process, time caps)."""
    from rahf.data.synth import generate

    root = tmp_path_factory.mktemp("synth64")
    generate(root, train=32, dev=8, test=8, size=64, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """An untrained tiny model saved with save_pretrained (seeded: the same weights every run)."""
    from rahf import RAHF, RAHFConfig

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tinyck")
    RAHF(RAHFConfig.preset("tiny")).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def known_ckpt(tmp_path_factory):
    """``(model, directory)``: the model of ``known_model.py`` (scores and maps set by hand in its heads),
    saved with save_pretrained."""
    from known_model import known_model

    model = known_model()
    d = tmp_path_factory.mktemp("known_ckpt")
    model.save_pretrained(d)
    return model, d
