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
    # each output is its head applied to the right encoding: for the augmented variant, the image and
    # prompt encoded behind that output's own task prompt (one task at a time)
    with torch.no_grad():
        for t, task in enumerate(rahf.schema.TASKS[:-1]):
            one = {k: batch[k][t:t + 1] for k in ("task_ids", "task_mask") if k in batch}
            fmap = model._encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], **one)[2]
            if task in rahf.MAP_NAMES:
                head = model.heatmap_heads[task] if variant == "multi_head" else model.heatmap_head
                assert torch.allclose(out.heatmaps[task], head(fmap), atol=1e-5), task
            else:
                head = model.score_heads[task] if variant == "multi_head" else model.score_head
                assert torch.allclose(out.scores[:, rahf.SCORE_NAMES.index(task)], head(fmap), atol=1e-5), task
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


# ----------------------------------------------------------------------------- config: defaults, head styles
from rahf.configtools import ConfigError, to_dict  # noqa: E402
from rahf.model.config import HEAD_STYLES, PRESETS, RAHFConfig  # noqa: E402


def test_default_config_is_the_tiny_preset():
    cfg = RAHFConfig()
    assert cfg == RAHFConfig.preset("tiny")
    assert cfg.preset == "tiny" and cfg.head_style == "tiny" and cfg.heatmap_size == 64
    assert RAHFConfig.from_dict({}) == cfg
    assert json.loads(json.dumps(cfg.to_dict()))["preset"] == "tiny"  # every default serialises
    assert list(cfg.task_prompts) == list(rahf.schema.TASKS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_records_its_head_style(name, tmp_path):
    cfg = RAHFConfig.preset(name)
    style = {"tiny": "tiny", "paper": "light", "large384": "light"}[name]
    assert cfg.head_style == style
    assert to_dict({"heatmap_head": cfg.heatmap_head, "score_head": cfg.score_head}) == to_dict(HEAD_STYLES[style])
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["head_style"] == style
    assert RAHFConfig.load(tmp_path / "config.json") == cfg


def test_head_style_is_applied_and_kept_truthful():
    repro = RAHFConfig.preset("paper", head_style="repro")
    assert repro.head_style == "repro" and repro.heatmap_head.up_channels == (768, 384, 384, 192)
    assert repro.score_head.channels == () and repro.heatmap_size == 224
    assert RAHFConfig.preset("tiny", head_style="light_heatmap").score_head == repro.score_head
    # head keys next to a style apply on top of it; heads that are no style are "custom"
    edited = RAHFConfig.preset("paper", head_style="repro", heatmap_head={"upsample": 2})
    assert edited.head_style == "custom" and edited.heatmap_head.upsample == 2
    assert edited.heatmap_head.up_channels == (768, 384, 384, 192)
    assert RAHFConfig.preset("tiny", score_head={"mlp": [32]}).head_style == "custom"
    # editing the heads back to a style's reads as that style
    assert RAHFConfig.preset("tiny", **HEAD_STYLES["light"]).head_style == "light"
    # a hand-edited config.json whose heads no longer match its head_style loads as custom
    data = repro.to_dict()
    data["score_head"]["mlp"] = [64, 32]
    assert RAHFConfig.from_dict(data).head_style == "custom"
    assert repro.replace(heatmap_head={"upsample": 2}).head_style == "custom"
    assert repro.replace(head_style="light") == RAHFConfig.preset("paper")
    with pytest.raises(ConfigError, match="head_style='repro', but heatmap_head/score_head are not that style's"):
        RAHFConfig(head_style="repro")  # a claim the (tiny) heads contradict
    with pytest.raises(ConfigError, match="unknown style 'huge'"):
        RAHFConfig.preset("tiny", head_style="huge")


@pytest.mark.parametrize("name,overrides,style", [("paper", {}, "light"), ("paper", {"head_style": "repro"}, "repro"),
                                                  ("tiny", {}, "tiny"),
                                                  ("tiny", {"heatmap_head": {"upsample": 1}}, "custom")])
def test_config_json_without_head_style_still_loads(name, overrides, style):
    cfg = RAHFConfig.preset(name, **overrides)
    old = json.loads(json.dumps(cfg.to_dict()))
    del old["head_style"]  # as written before the field existed
    loaded = RAHFConfig.from_dict(old)
    assert loaded == cfg and loaded.head_style == style


def test_checkpoint_without_head_style_loads(tmp_path):
    torch.manual_seed(0)
    cfg = RAHFConfig.preset("tiny", heatmap_head={"upsample": 1})
    model = rahf.RAHF(cfg).eval()
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["head_style"] == "custom"
    del saved["head_style"]
    path.write_text(json.dumps(saved))
    loaded = rahf.RAHF.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.heatmap_head == cfg.heatmap_head and loaded.config.head_style == "custom"
    batch = RAHFCollator.for_model(model)(fake_items(cfg))
    with torch.no_grad():
        assert torch.equal(model(**tensors(batch)).scores, loaded(**tensors(batch)).scores)


# ----------------------------------------------------------------------------- vision stems
@pytest.mark.parametrize("stem", ["conv", "conv_ln"])
def test_conv_stem_keeps_the_patch_grid_and_roundtrips(tmp_path, stem):
    torch.manual_seed(2)
    cfg = rahf.RAHFConfig.preset("tiny", vision={"stem": stem})
    model = rahf.RAHF(cfg)
    convs = [m for m in model.vision.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    # four stride-2 3x3 convolutions (16 px patches = 2^4), widths rising to embed_dim, then the 1x1 projection
    assert [c.stride for c in convs[:-1]] == [(2, 2)] * 4 and all(c.kernel_size == (3, 3) for c in convs[:-1])
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 128] and convs[-1].kernel_size == (1, 1)
    assert model.grid == cfg.grid_size == 8
    batch = RAHFCollator.for_model(model)(fake_items(cfg))
    out = model(**tensors(batch))
    assert out.heatmaps["implausibility"].shape == (3, 64, 64)
    (sum(h.sum() for h in out.heatmaps.values()) + out.scores.sum() + out.logits.logsumexp(-1).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.patch_embed.parameters())
    norms = {type(m).__name__ for m in model.vision.patch_embed.modules() if type(m).__name__.endswith("Norm2d")
             or type(m).__name__.endswith("NormAct2d")}
    assert norms == {"BatchNormAct2d" if stem == "conv" else "LayerNormAct2d"}
    # in eval mode a token's features do not depend on the other images of its batch; in training they do
    # with BatchNorm (batch statistics) and do not with LayerNorm
    pv = batch["pixel_values"]
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            alone, together = model.vision.forward_features(pv[:1]), model.vision.forward_features(pv)[:1]
        assert torch.allclose(alone, together, atol=1e-5) == (not training or stem == "conv_ln"), training
    model.train()
    with torch.no_grad():  # BatchNorm's running statistics move in training and are saved with the weights
        model.vision.forward_features(pv * 3 + 1)
    model.eval().save_pretrained(tmp_path / "ckpt")
    loaded = rahf.RAHF.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.vision.stem == stem
    with torch.no_grad():
        assert torch.equal(model(**tensors(batch)).scores, loaded(**tensors(batch)).scores)


def test_conv_stem_refusals():
    with pytest.raises(ConfigError, match="unknown stem"):
        rahf.RAHF(rahf.RAHFConfig.preset("tiny", vision={"stem": "hybrid"}))
    with pytest.raises(ConfigError, match="power-of-two patch_size"):
        rahf.RAHF(rahf.RAHFConfig.preset("tiny", vision={"stem": "conv", "img_size": 120, "patch_size": 12}))
    with pytest.raises(ConfigError, match="linear patch embedding"):
        rahf.RAHFConfig.preset("tiny", vision={"stem": "conv", "pretrained": "vit_tiny_patch16_224"}).validate()


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_score_text_adds_a_logit_from_the_prompt_tokens(tmp_path, variant):
    """model.score_text: each score is sigmoid(its image head's logit + an MLP on the masked mean and max
    of the fused prompt tokens); padding does not count; it starts at zero, learns, and is saved."""
    torch.manual_seed(2)
    cfg = rahf.RAHFConfig.preset("tiny", variant=variant, vision={"img_size": 64, "depth": 1},
                                 text={"num_layers": 1, "num_decoder_layers": 1}, score_text=True)
    model = rahf.RAHF(cfg).eval()
    items = fake_items(cfg)
    coll = RAHFCollator.for_model(model)
    batch = coll(items)
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: padded
    with torch.no_grad():
        before = model(**tensors(batch)).scores
        nn = model.score_text
        torch.nn.init.normal_(nn[-1].weight, std=0.5)
        torch.nn.init.normal_(nn[-1].bias, std=0.5)
        out = model(**tensors(batch))
        assert (out.scores - before).abs().max() > 1e-3  # the zero-initialised layer was all it lacked
        task = {k: batch[k] for k in ("task_ids", "task_mask") if k in batch}
        hidden, _, fmap, _ = model._encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], **task)
        B, L = batch["input_ids"].shape
        if variant == "multi_head":
            img = torch.stack([model.score_heads[s].logits(fmap) for s in rahf.SCORE_NAMES], 1)
        else:
            n = len(rahf.MAP_NAMES)
            img = model.score_head.logits(fmap[n * B:(n + 4) * B]).view(4, B).t()
            hidden = hidden[(n + 4) * B:]
        txt = hidden[:, -L:]
        pooled = []
        for j in range(B):
            valid = txt[j, batch["attention_mask"][j].bool()]
            pooled.append(torch.cat([valid.mean(0), valid.max(0).values]))
        by_hand = torch.sigmoid(img + nn(torch.stack(pooled)))
        torch.testing.assert_close(out.scores, by_hand, atol=1e-5, rtol=1e-5)
        for j in range(B):  # alone, unpadded: the same scores
            alone = coll([items[j]])
            torch.testing.assert_close(model(**tensors(alone)).scores[0], out.scores[j], atol=1e-5, rtol=1e-5)
    model.train()
    out = model(**tensors(batch))
    rahf.RAHFLoss(cfg.loss)(out, batch)["score_loss"].backward()
    assert nn[0].weight.grad.abs().sum() > 0 and nn[-1].weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path / "ckpt")
    loaded = rahf.RAHF.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**tensors(batch)).scores, model(**tensors(batch)).scores)
