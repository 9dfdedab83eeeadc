"""The scene head: per-patch shape / colour / size targets regenerated from synth scenes, the head and its loss."""

import numpy as np
import pytest
import torch

from rahf.configtools import ConfigError
from rahf.data import open_dataset, synth
from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset
from rahf.model import RAHF, RAHFConfig
from rahf.model.config import LossConfig
from rahf.model.loss import RAHFLoss

ATTRS = list(synth.SCENE_ATTRIBUTES.items())
OFFSETS = np.cumsum([0] + [len(v) for _, v in ATTRS])


def _block(t: np.ndarray, attr: str) -> np.ndarray:
    i = [a for a, _ in ATTRS].index(attr)
    return t[:, OFFSETS[i]:OFFSETS[i + 1]]


@pytest.mark.parametrize("easy", [0.0, 1.0])
def test_record_scene_is_the_drawn_scene(easy):
    """The scene regenerated without rendering is the one make_record drew (errors, drawn groups, places)."""
    for i in range(12):
        rec = synth.make_record(3, "train", i, 64, easy)
        sc = synth.record_scene(3, "train", i, easy)
        assert sc.errors == rec.scene.errors and sc.place_error == rec.scene.place_error
        assert sc.drawn == rec.scene.drawn
        assert [(p.x, p.y, p.r, p.group, p.drawn) for p in sc.instances] == \
               [(p.x, p.y, p.r, p.group, p.drawn) for p in rec.scene.instances]


def test_scene_targets_mark_what_is_drawn_where():
    """Each attribute's shares sum to 1 per patch; the patches the targets call wholly one colour show
    that colour in the rendered image; the shape named is the drawn one (a shape error: not the asked one)."""
    palette = np.array(list(synth.COLOURS.values()), np.float32)
    checked = wrong = shape_errors = 0
    for i in range(40):
        rec = synth.make_record(0, "train", i, 128, 0.5)
        t = synth.scene_targets(rec.scene, 32)  # 4-px cells of the 128-px image
        assert t.shape == (32 * 32, synth.SCENE_CLASSES) and t.dtype == np.float32
        for a, _ in ATTRS:
            np.testing.assert_allclose(_block(t, a).sum(1), 1.0, atol=1e-5)
        img = np.asarray(rec.image, np.float32).reshape(32, 4, 32, 4, 3).mean((1, 3)).reshape(-1, 3)
        col = _block(t, "colour").reshape(32, 32, -1)
        full = col[..., 1:].max(-1) == 1.0
        for y, x in zip(*np.nonzero(full[1:-1, 1:-1])):
            y, x = y + 1, x + 1
            c = col[y, x].argmax()
            if not (full[y - 1:y + 2, x - 1:x + 2].all() and (col[y - 1:y + 2, x - 1:x + 2].argmax(-1) == c).all()):
                continue  # only cells inside an object (an outline or a neighbour's edge darkens the others)
            nearest = np.abs(palette - img[32 * y + x]).sum(1).argmin()
            checked += 1
            wrong += nearest != c - 1
        named = {synth.SCENE_ATTRIBUTES["shape"][j] for j in np.flatnonzero(_block(t, "shape")[:, 1:].sum(0) > 0) + 1}
        drawn_groups = {p.group for p in rec.scene.instances if p.drawn}
        assert named == {rec.scene.drawn[g].shape for g in drawn_groups}, (i, named)
        if any(e == "shape" for e in rec.scene.errors.values()):
            shape_errors += 1
            g = next(g for g, e in rec.scene.errors.items() if e == "shape")
            assert rec.scene.drawn[g].shape != rec.scene.spec.groups[g].shape
        # a scene with nothing drawn is background everywhere
        if not drawn_groups:
            assert (_block(t, "shape")[:, 0] == 1).all()
    assert checked > 500 and wrong / checked < 0.03, (checked, wrong)  # artifacts repaint a few cells
    assert shape_errors > 0


def test_scene_targets_follow_size_words():
    rec = synth.make_record(1, "train", 0, 64, 1.0)  # one object
    t = synth.scene_targets(rec.scene, 8)
    size = rec.scene.drawn[0].size or "medium"
    covered = _block(t, "size")[:, 1:].sum(0)
    assert covered.argmax() + 1 == synth.SCENE_ATTRIBUTES["size"].index(size) and (covered > 0).sum() == 1


def test_synth_scenes_by_uid(tmp_path):
    """Variants share their record's scene; other uids and other datasets have none."""
    from rahf.data.synth_variants import grouped_generate

    synth.generate(tmp_path, train=0, dev=2, test=0, size=32, seed=5, workers=1)
    grouped_generate(tmp_path, "train", 6, 2, size=32, seed=5, pick="balanced", easy_fraction=0.5, workers=1)
    scenes = synth.SynthScenes(tmp_path, "train")
    split = open_dataset(tmp_path, "train")
    uids = [e["uid"] for e in split.entries]
    assert any("~" in u for u in uids)
    for u in uids:
        i = int(u.split("~")[0].rsplit("-", 1)[1])
        want = synth.scene_targets(synth.record_scene(5, "train", i, 0.5), 4)
        np.testing.assert_array_equal(scenes.targets(u, 4), want)
    assert scenes.targets("synth-dev-000001", 4) is None and scenes.targets("photo-17", 4) is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dataset.json").write_text('{"format": "rahf-dataset", "version": 1, "source": "richhf"}')
    with pytest.raises(ValueError, match="not a synth dataset"):
        synth.SynthScenes(tmp_path / "other", "train")


def _model(vision=None, **kw) -> RAHF:
    torch.manual_seed(0)
    cfg = RAHFConfig.preset("tiny", vision={"img_size": 64, "depth": 1, **(vision or {})},
                            text={"num_layers": 1, "num_decoder_layers": 1}, scene_head=True, **kw)
    return RAHF(cfg)


def _batch(model, root, split="train", n=4):
    ds = RAHFTorchDataset(open_dataset(root, split), model.config.vision.img_size, model.heatmap_size,
                          scene_grid=model.grid)
    return RAHFCollator.for_model(model)([ds[i] for i in range(n)])


def _forward(model, batch):
    return model(**{k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")
                    if k in batch}, task_ids=batch.get("task_ids"), task_mask=batch.get("task_mask"))


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_scene_head_reads_the_image_tokens_and_its_loss(tmp_path, variant):
    synth.generate(tmp_path, train=4, dev=0, test=0, size=64, seed=0, workers=1)
    model = _model(variant=variant)
    batch = _batch(model, tmp_path)
    assert batch["scene_targets"].shape == (4, model.grid ** 2, synth.SCENE_CLASSES) and batch["scene_known"].all()
    out = _forward(model, batch)
    assert out.scene_logits.shape == batch["scene_targets"].shape
    # the head reads the projected image tokens, before the fusion: the prompt does not change it
    other = dict(batch)
    other.update(RAHFCollator.for_model(model).tokenize_prompts(["a green star"] * 4))
    torch.testing.assert_close(_forward(model, other).scene_logits, out.scene_logits)
    cfg = LossConfig(scene=0.5)
    losses = RAHFLoss(cfg)(out, batch)
    t = batch["scene_targets"]
    assert (t[..., 0] < 1).any() and (t[..., 0] == 1).any()  # object and background patches
    w = 1 + (cfg.scene_object_weight - 1) * (1 - t[..., 0])  # object patches weigh more (default 5)
    by_hand = 0.0
    for lo, hi in zip(OFFSETS[:-1], OFFSETS[1:]):
        logp = torch.log_softmax(out.scene_logits[..., lo:hi], -1)
        by_hand += ((-(t[..., lo:hi] * logp).sum(-1) * w).sum() / w.sum()).item()
    assert cfg.scene_object_weight == 5
    assert losses["scene_loss"].item() == pytest.approx(by_hand, rel=1e-5)
    plain = RAHFLoss.scene_loss(out.scene_logits, t, batch["scene_known"], object_weight=1.0)
    assert plain.item() == pytest.approx(sum(-(t[..., lo:hi] * torch.log_softmax(out.scene_logits[..., lo:hi], -1))
                                             .sum(-1).mean().item() for lo, hi in zip(OFFSETS[:-1], OFFSETS[1:])),
                                         rel=1e-5)
    rest = (cfg.heatmap * losses["heatmap_loss"] + cfg.score * losses["score_loss"] + cfg.text * losses["text_loss"])
    assert losses["loss"].item() == pytest.approx((rest + 0.5 * losses["scene_loss"]).item(), rel=1e-5)
    # records whose scene is unknown do not count; none known: 0, with a gradient path
    known = torch.tensor([True, False, True, False])
    part = RAHFLoss.scene_loss(out.scene_logits, batch["scene_targets"], known)
    assert part.item() == pytest.approx(RAHFLoss.scene_loss(out.scene_logits[known], batch["scene_targets"][known],
                                                            torch.ones(2, dtype=torch.bool)).item(), rel=1e-6)
    assert RAHFLoss.scene_loss(out.scene_logits, batch["scene_targets"], torch.zeros(4, dtype=torch.bool)).item() == 0
    losses["scene_loss"].backward()
    assert model.vision.patch_embed.proj.weight.grad.abs().sum() > 0  # it reaches the vision encoder


@pytest.mark.slow
def test_scene_head_learns_the_scene(tmp_path):
    """Trained on the scene loss alone, the head names the colour drawn in held-out one-object scenes far
    above chance (6 colours)."""
    synth.generate(tmp_path, train=80, dev=0, test=0, size=64, seed=0, workers=1, easy_fraction=1.0)
    model = _model(vision={"patch_size": 8, "depth": 2, "stem": "conv"})
    ds = RAHFTorchDataset(open_dataset(tmp_path, "train"), 64, model.heatmap_size, scene_grid=model.grid)
    coll = RAHFCollator.for_model(model)
    items = [ds[i] for i in range(len(ds))]
    train, held = items[:64], items[64:]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(80):
        batch = coll([train[(step * 16 + j) % len(train)] for j in range(16)])
        loss = RAHFLoss.scene_loss(_forward(model, batch).scene_logits, batch["scene_targets"], batch["scene_known"], 5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = coll(held)
    with torch.no_grad():
        logits = _forward(model, batch).scene_logits[..., OFFSETS[1]:OFFSETS[2]]
    colour = batch["scene_targets"][..., OFFSETS[1]:OFFSETS[2]]
    obj = colour[..., 0] < 0.5  # patches mostly covered by the object
    hits, total = int((logits.argmax(-1) == colour.argmax(-1))[obj].sum()), int(obj.sum())
    assert total > 40 and hits / total > 0.6, (hits, total)


def test_trainer_refuses_a_scene_head_on_data_that_is_not_synth(tmp_path):
    from rahf.training.config import resolve_config
    from rahf.training.trainer import Trainer

    synth.generate(tmp_path / "d", train=4, dev=0, test=0, size=32, seed=0, workers=1)
    info = tmp_path / "d" / "dataset.json"
    info.write_text(info.read_text().replace('"synth"', '"custom"'))
    cfg = resolve_config(None, [f"data.root={tmp_path / 'd'}", "model.scene_head=true", "tracking.tracker=none",
                             f"run.output_dir={tmp_path / 'runs'}", "model.vision.img_size=32", "train.max_steps=1",
                               "data.num_workers=0"])
    with pytest.raises(ConfigError, match="model.scene_head.*not a synth dataset"):
        Trainer(cfg).build()


def test_scene_head_saves_loads_and_is_named_on_the_card(tmp_path):
    from rahf.model.card import build_model_card

    model = _model()
    model.save_pretrained(tmp_path / "m")
    again = RAHF.from_pretrained(tmp_path / "m")
    assert again.config.scene_head and again.config.loss.scene_object_weight == 5.0
    torch.testing.assert_close(again.scene_head.weight, model.scene_head.weight)
    assert "scene head" in str(build_model_card(tmp_path / "m"))
    plain = RAHF(RAHFConfig.preset("tiny", vision={"img_size": 32, "depth": 1}, text={"num_layers": 1, "num_decoder_layers": 1}))
    assert plain.scene_head is None
    plain.save_pretrained(tmp_path / "p")
    assert "scene head" not in str(build_model_card(tmp_path / "p"))
