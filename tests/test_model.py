import json

import pytest
import torch

import rahf
from rahf.data.torch_data import RAHFCollator


def fake_items(cfg, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs, s = cfg.heatmap_size, cfg.vision.img_size
    prompts = ["a red circle left of a blue square", "two green triangles", "a big yellow star above a cat"]
    tagged = ["a red_0 circle left of a blue square", "two_0 green triangles", "a big yellow star above a cat_0"]
    return [{"index": i, "uid": f"u{i}", "prompt": prompts[i % 3], "tagged_prompt": tagged[i % 3],
             "pixel_values": torch.randn(3, s, s, generator=g), "scores": torch.rand(4, generator=g),
             "implausibility_map": torch.rand(hs, hs, generator=g), "misalignment_map": torch.zeros(hs, hs)}
            for i in range(n)]


def tensors(batch):
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(0)
    cfg = rahf.RAHFConfig.preset("tiny", variant=variant)
    model = rahf.RAHF(cfg)
    batch = RAHFCollator.for_model(model)(fake_items(cfg))
    out = model(**tensors(batch))
    losses = rahf.RAHFLoss(cfg.loss)(out, batch)
    assert set(losses) >= {"loss", "heatmap_loss", "score_loss", "text_loss", "implausibility_loss", "overall_loss"}
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    assert out.heatmaps["implausibility"].shape == (3, cfg.heatmap_size, cfg.heatmap_size)
    assert out.scores.shape == (3, 4)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.logits.shape[:2] == batch["labels"].shape


@pytest.mark.parametrize("name,grid,hm", [("tiny", 8, 64), ("paper", 14, 224), ("large384", 24, 384)])
def test_preset_geometry_without_allocating(name, grid, hm):
    cfg = rahf.RAHFConfig.preset(name)
    with torch.device("meta"):
        model = rahf.RAHF(cfg)
        x = torch.empty(2, 3, cfg.vision.img_size, cfg.vision.img_size)
        tokens = model.vision.forward_features(x)[:, model.num_prefix_tokens:]
        fmap = torch.empty(2, cfg.text.d_model, model.grid, model.grid)
        heat = model.heatmap_heads["implausibility"](fmap)
        score = model.score_heads["overall"](fmap)
    assert model.grid == grid and cfg.heatmap_size == hm
    assert tokens.shape == (2, grid * grid, model.vision.num_features)
    assert model.projection.out_features == model.t5.config.d_model == cfg.text.d_model
    assert heat.shape == (2, hm, hm) and score.shape == (2,)
    if name != "tiny":
        assert model.t5.config.num_layers == 12 and model.t5.config.d_model == 768


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_save_load_roundtrip_identical_outputs(tmp_path, variant):
    torch.manual_seed(1)
    cfg = rahf.RAHFConfig.preset("tiny", variant=variant)
    model = rahf.RAHF(cfg).eval()
    batch = RAHFCollator.for_model(model)(fake_items(cfg))
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = rahf.RAHF.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        a, b = model(**tensors(batch)), loaded(**tensors(batch))
    for m in rahf.MAP_NAMES:
        assert torch.equal(a.heatmaps[m], b.heatmaps[m])
    assert torch.equal(a.scores, b.scores) and torch.equal(a.logits, b.logits)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["variant"] == variant
    assert loaded.tokenizer("a red_0 circle")["input_ids"] == model.tokenizer("a red_0 circle")["input_ids"]


def test_collate_pads_labels_with_minus_100():
    cfg = rahf.RAHFConfig.preset("tiny")
    model = rahf.RAHF(cfg)
    items = fake_items(cfg)
    batch = RAHFCollator.for_model(model)(items)
    lab, tok = batch["labels"], model.tokenizer
    lengths = [len(tok(t)["input_ids"]) for t in batch["tagged_prompts"]]
    assert lab.shape == (3, max(lengths))
    for row, n in zip(lab, lengths):
        assert (row[:n] != -100).all() and (row[n:] == -100).all()
        assert row[n - 1] == tok.eos_token_id
    assert batch["attention_mask"].sum(1).tolist() == [len(tok(p)["input_ids"]) for p in batch["prompts"]]
    # the tag is a token of its own and decodes back to the tagged prompt
    from rahf.model.tokenizer import decode_tagged
    assert decode_tagged(tok, lab.clamp(min=0)) == batch["tagged_prompts"]


def test_augmented_collator_adds_task_prefixes():
    cfg = rahf.RAHFConfig.preset("tiny", variant="augmented_prompt")
    model = rahf.RAHF(cfg)
    batch = RAHFCollator.for_model(model)(fake_items(cfg))
    assert batch["task_ids"].shape[0] == 7 and batch["task_mask"].shape == batch["task_ids"].shape


def test_unknown_preset_and_bad_geometry():
    with pytest.raises(ValueError, match="unknown preset"):
        rahf.RAHFConfig.preset("huge")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        rahf.RAHF(rahf.RAHFConfig.preset("tiny", vision={"img_size": 120}))
