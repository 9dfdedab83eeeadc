"""Pretrained encoders load in full or not at all (rahf.model.pretrained).

Small checkpoints of each public layout are written here with random weights, as their publishers lay them
out: T5 v1.0 (relu, lm_head = the shared embedding, outputs scaled), T5 v1.1 (gated-gelu, an lm_head of
its own) and Flan-T5 (v1.1 with its config flavour, bf16, sharded); a timm ViT as timm saves it (folder
with config.json + model.safetensors) and as a bare .safetensors file. Hub names resolve from a Hugging
Face cache laid out in a temporary directory (offline; nothing is fetched).
"""

import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import get_pretrained_cfg
from transformers import T5Config, T5ForConditionalGeneration

from rahf import RAHF, RAHFConfig
from rahf.configtools import ConfigError
from rahf.model.pretrained import PretrainedMismatchError, check_random_init
from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer
from rahf.training.trainer import main as train_main

T5_DIMS = {"vocab_size": 300, "d_model": 64, "d_kv": 16, "d_ff": 96, "num_layers": 2, "num_decoder_layers": 1,
           "num_heads": 4, "dropout_rate": 0.1, "relative_attention_num_buckets": 16,
           "relative_attention_max_distance": 64}
# config.json as published, the sizes scaled down: t5-base (v1.0 states neither feed_forward_proj nor
# tie_word_embeddings: relu, tied), google/t5-v1_1-base, google/flan-t5-base
T5_LAYOUTS = {
    "t5_v1_0": {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "decoder_start_token_id": 0,
                "eos_token_id": 1, "pad_token_id": 0, "initializer_factor": 1.0, "is_encoder_decoder": True,
                "layer_norm_epsilon": 1e-6, "n_positions": 512, "output_past": True,
                "task_specific_params": {"translation_en_to_de": {"prefix": "translate English to German: "}}},
    "t5_v1_1": {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "decoder_start_token_id": 0,
                "eos_token_id": 1, "pad_token_id": 0, "initializer_factor": 1.0, "is_encoder_decoder": True,
                "layer_norm_epsilon": 1e-6, "output_past": True, "feed_forward_proj": "gated-gelu",
                "tie_word_embeddings": False},
    "flan_t5": {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "decoder_start_token_id": 0,
                "eos_token_id": 1, "pad_token_id": 0, "initializer_factor": 1.0, "is_encoder_decoder": True,
                "layer_norm_epsilon": 1e-6, "n_positions": 512, "output_past": True, "feed_forward_proj": "gated-gelu",
                "dense_act_fn": "gelu_new", "is_gated_act": True, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "transformers_version": "4.23.1", "use_cache": True,
                "task_specific_params": {"summarization": {"prefix": "summarize: "}}},
}
TIED = {"t5_v1_0": True, "t5_v1_1": False, "flan_t5": False}
# the tiny preset's ViT (so that a tiny RAHF takes the checkpoint as it is)
VIT = {"img_size": 128, "patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
VIT_MEAN, VIT_STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


def write_t5(directory: Path, layout: str, seed: int = 0) -> Path:
    """A T5 checkpoint of ``layout`` with random weights: v1.0 with every embedding alias in the file (as
    converted checkpoints have), v1.1 with its own lm_head, Flan-T5 in bf16 shards with an index."""
    cfg = {**T5_LAYOUTS[layout], **T5_DIMS}
    torch.manual_seed(seed)
    ref = T5ForConditionalGeneration(T5Config(**T5_DIMS, feed_forward_proj=cfg.get("feed_forward_proj", "relu")))
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    if TIED[layout]:
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            sd[alias] = sd["shared.weight"].clone()
    else:
        del sd["encoder.embed_tokens.weight"], sd["decoder.embed_tokens.weight"]
        sd["lm_head.weight"] = torch.randn_like(sd["shared.weight"])  # its own
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if layout == "flan_t5":
        save_torch_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()}, directory, max_shard_size="40KB")
    else:
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def checkpoint_tensors(directory: Path) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_vit(directory: Path, arch: str = "vit_tiny_patch16_224", seed: int = 0, timm_layout: bool = True,
              **dims) -> Path:
    """A timm ViT with a 10-class head: as timm saves it (``timm_layout``: config.json with a pretrained_cfg of
    non-0.5 mean/std + model.safetensors), else a bare model.safetensors."""
    dims = {**VIT, **dims}
    torch.manual_seed(seed)
    vit = timm.create_model(arch, pretrained=False, num_classes=10, **dims)
    directory.mkdir(parents=True)
    if timm_layout:
        from timm.models import save_for_hf

        vit.pretrained_cfg = {**vit.pretrained_cfg, "mean": VIT_MEAN, "std": VIT_STD}
        save_for_hf(vit, str(directory), model_args={**dims, "num_classes": 10}, safe_serialization=True)
    else:
        save_file(vit.state_dict(), str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return {layout: write_t5(root / layout, layout) for layout in T5_LAYOUTS}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return write_vit(tmp_path_factory.mktemp("vit") / "vit_tiny_patch16_224.custom")


def tiny(**overrides) -> RAHFConfig:
    return RAHFConfig.preset("tiny", **overrides)


def put_in_hub_cache(src: Path, cache: Path, repo_id: str, commit: str = "c" * 40) -> None:
    """``src``'s files as huggingface_hub keeps a downloaded snapshot (``refs/main`` → ``snapshots/<commit>``)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


# ----------------------------------------------------------------------------- T5
@pytest.mark.parametrize("layout", list(T5_LAYOUTS))
def test_every_t5_tensor_arrives_with_the_checkpoints_architecture(t5_dirs, layout):
    ckpt = t5_dirs[layout]
    model = RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(ckpt)}))
    published = json.loads((ckpt / "config.json").read_text())
    t = model.config.text
    for key, value in T5_DIMS.items():
        assert getattr(t, key) == value, key
    assert t.feed_forward_proj == published.get("feed_forward_proj", "relu")
    assert t.tie_word_embeddings is TIED[layout]
    mine = model.t5.state_dict()
    file = checkpoint_tensors(ckpt)
    for key, tensor in file.items():
        assert torch.equal(mine[key], tensor.float()), key
    # every tensor of the model came from the file: directly, or as an alias of the shared embedding
    aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    aliases |= {"lm_head.weight"} if TIED[layout] else set()
    assert set(mine) - set(file) <= aliases
    for key in set(mine) - set(file):
        assert torch.equal(mine[key], file["shared.weight"].float())
    assert (model.t5.lm_head.weight is model.t5.shared.weight) is TIED[layout]
    # and it computes what transformers' own load of the checkpoint computes (the v1.0 output scaling included)
    ref = T5ForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids, dec = torch.tensor([[5, 9, 17, 1]]), torch.tensor([[0, 33, 7]])
    with torch.no_grad():
        assert torch.allclose(model.t5.eval()(input_ids=ids, decoder_input_ids=dec).logits,
                              ref(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-5)


def test_saved_model_reloads_without_the_pretrained_checkpoint(t5_dirs, vit_dir, tmp_path):
    text, vision = shutil.copytree(t5_dirs["t5_v1_1"], tmp_path / "t5"), shutil.copytree(vit_dir, tmp_path / "vit")
    model = RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(text)}, vision={"pretrained": str(vision)}))
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(text), shutil.rmtree(vision)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["text"]["feed_forward_proj"] == "gated-gelu" and saved["text"]["tie_word_embeddings"] is False
    assert saved["text"]["d_model"] == 64 and tuple(saved["vision"]["mean"]) == VIT_MEAN
    loaded = RAHF.from_pretrained(tmp_path / "ckpt")
    assert loaded.t5.lm_head.weight is not loaded.t5.shared.weight
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_wins_over_the_configs_t5_fields(t5_dirs, caplog):
    cfg = tiny(text={"pretrained": str(t5_dirs["t5_v1_0"]), "d_model": 256, "num_layers": 6})
    with caplog.at_level("WARNING", logger="rahf.model"):
        model = RAHF.from_pretrained_encoders(cfg)
    assert (model.config.text.d_model, model.config.text.num_layers) == (64, 2)
    assert "model.text.d_model: 256 -> 64" in caplog.text and "model.text.num_layers: 6 -> 2" in caplog.text


def test_a_partial_t5_checkpoint_fails_naming_the_key(t5_dirs, tmp_path):
    ckpt = shutil.copytree(t5_dirs["t5_v1_1"], tmp_path / "partial")
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PretrainedMismatchError, match=r"missing from the checkpoint: encoder\.block\.1\.layer\.1"
                                                      r"\.DenseReluDense\.wi_1\.weight"):
        RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(ckpt)}))


def test_a_t5_whose_config_says_relu_over_gated_weights_fails_naming_the_keys(t5_dirs, tmp_path):
    ckpt = shutil.copytree(t5_dirs["t5_v1_1"], tmp_path / "liar")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["feed_forward_proj"] = "relu"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedMismatchError) as err:
        RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(ckpt)}))
    msg = str(err.value)
    assert "missing from the checkpoint" in msg and "decoder.block.0.layer.2.DenseReluDense.wi.weight" in msg
    assert "the model does not have" in msg and "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in msg


def test_a_t5_of_another_shape_fails_naming_the_tensors(t5_dirs, tmp_path):
    ckpt = shutil.copytree(t5_dirs["t5_v1_0"], tmp_path / "shape")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["d_ff"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedMismatchError,
                       match=r"of another shape: .*encoder\.block\.0\.layer\.1\.DenseReluDense\.wi\.weight "
                             r"\(checkpoint \(96, 64\), model \(128, 64\)\)"):
        RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(ckpt)}))


def test_a_tied_t5_with_its_own_lm_head_fails(t5_dirs, tmp_path):
    ckpt = shutil.copytree(t5_dirs["t5_v1_0"], tmp_path / "untied")
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PretrainedMismatchError, match="lm_head.weight is not its shared embedding"):
        RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(ckpt)}))


def test_a_t5_vocabulary_smaller_than_the_tokenizer_fails(tmp_path):
    ckpt = tmp_path / "small_vocab"
    T5ForConditionalGeneration(T5Config(**{**T5_DIMS, "vocab_size": 100})).save_pretrained(ckpt)
    with pytest.raises(PretrainedMismatchError, match="vocabulary of 100, fewer than the tokenizer's"):
        RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(ckpt)}))


def test_loading_into_a_model_of_another_architecture_fails_and_changes_nothing(t5_dirs, vit_dir):
    model = RAHF(tiny(vision={"pretrained": str(vit_dir)}, text={"pretrained": str(t5_dirs["t5_v1_1"])}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedMismatchError, match=r"model\.text\.d_model \(checkpoint 64, model 128\).*"
                                                      r"feed_forward_proj \(checkpoint 'gated-gelu', model 'relu'\)"):
        model.load_pretrained_encoders()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.vision.mean == (0.5, 0.5, 0.5)


def test_t5_names_resolve_from_the_hub_cache_only(t5_dirs, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        RAHF.from_pretrained_encoders(tiny(text={"pretrained": "acme/t5-not-cached"}))
    with pytest.raises(ConfigError, match="no such directory"):
        RAHF.from_pretrained_encoders(tiny(text={"pretrained": str(tmp_path / "nowhere")}))
    put_in_hub_cache(t5_dirs["t5_v1_1"], cache, "acme/t5-small-v1_1")
    model = RAHF.from_pretrained_encoders(tiny(text={"pretrained": "acme/t5-small-v1_1"}))
    file = checkpoint_tensors(t5_dirs["t5_v1_1"])
    assert all(torch.equal(model.t5.state_dict()[k], v) for k, v in file.items())


# ----------------------------------------------------------------------------- ViT
def test_every_vit_tensor_arrives_and_mean_std_come_from_its_pretrained_cfg(vit_dir):
    model = RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(vit_dir)}))
    assert (model.config.vision.mean, model.config.vision.std) == (VIT_MEAN, VIT_STD)
    file, mine = load_file(str(vit_dir / "model.safetensors")), model.vision.state_dict()
    assert set(file) - set(mine) == {"head.weight", "head.bias"}  # the classifier, dropped on purpose
    assert set(mine) <= set(file) and all(torch.equal(mine[k], file[k]) for k in mine)
    # timm's own reading of the same file gives the same ViT
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, global_pool="",
                            pretrained_cfg_overlay={"file": str(vit_dir / "model.safetensors")}, **VIT)
    assert all(torch.equal(mine[k], v) for k, v in ref.state_dict().items())
    # the weights file itself finds the config.json beside it
    by_file = RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(vit_dir / "model.safetensors")}))
    assert by_file.config.vision.mean == VIT_MEAN


def test_a_bare_vit_file_takes_mean_std_from_timms_registry(tmp_path):
    d = write_vit(tmp_path / "deit", arch="deit_tiny_patch16_224", timm_layout=False)
    cfg = tiny(vision={"arch": "deit_tiny_patch16_224", "pretrained": str(d / "model.safetensors")})
    model = RAHF.from_pretrained_encoders(cfg)
    assert model.config.vision.mean == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert model.config.vision.std == pytest.approx(IMAGENET_DEFAULT_STD)
    file = load_file(str(d / "model.safetensors"))
    assert all(torch.equal(v, file[k]) for k, v in model.vision.state_dict().items())


@pytest.mark.parametrize("change,named", [({"img_size": 96}, "img_size=128, patch_size=16; the model has "
                                                              "model.vision.img_size=96, model.vision.patch_size=16"),
                                          ({"patch_size": 8}, "img_size=128, patch_size=16; the model has "
                                                              "model.vision.img_size=128, model.vision.patch_size=8")])
def test_a_vit_of_another_geometry_fails_naming_both(vit_dir, change, named):
    with pytest.raises(PretrainedMismatchError, match="allow_resize") as err:
        RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(vit_dir), **change}))
    assert named in str(err.value)


def test_allow_resize_resamples_the_position_embedding_with_timm(vit_dir):
    model = RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(vit_dir), "img_size": 96,
                                                       "allow_resize": True}))
    file, mine = load_file(str(vit_dir / "model.safetensors")), model.vision.state_dict()
    assert mine["pos_embed"].shape == (1, 1 + 6 * 6, 128)
    assert torch.equal(mine["pos_embed"], resample_abs_pos_embed(file["pos_embed"], [6, 6], num_prefix_tokens=1))
    assert all(torch.equal(v, file[k]) for k, v in mine.items() if k != "pos_embed")


def test_a_partial_or_foreign_vit_fails_naming_the_keys(vit_dir, tmp_path):
    sd = load_file(str(vit_dir / "model.safetensors"))
    partial = {k: v for k, v in sd.items() if k != "blocks.2.mlp.fc2.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(PretrainedMismatchError, match=r"1 model tensors missing from the checkpoint: "
                                                      r"blocks\.2\.mlp\.fc2\.weight"):
        RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(tmp_path / "partial.safetensors")}))
    save_file({**sd, "blocks.4.norm1.weight": torch.ones(128)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(PretrainedMismatchError, match=r"checkpoint tensors the model does not have: "
                                                      r"blocks\.4\.norm1\.weight"):
        RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(tmp_path / "extra.safetensors")}))
    wide = write_vit(tmp_path / "wide", timm_layout=False, embed_dim=64, num_heads=2)
    with pytest.raises(PretrainedMismatchError, match=r"blocks\.0\.attn\.qkv\.weight \(checkpoint \(192, 64\), "
                                                      r"model \(384, 128\)\)"):
        RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(wide)}))


def test_vit_names_resolve_from_the_hub_cache_only(tmp_path, monkeypatch):
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        RAHF.from_pretrained_encoders(tiny(vision={"pretrained": name}))
    with pytest.raises(ConfigError, match="hf-hub:org/name"):
        RAHF.from_pretrained_encoders(tiny(vision={"pretrained": "acme/vit"}))
    (tmp_path / "vit.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="only safetensors"):
        RAHF.from_pretrained_encoders(tiny(vision={"pretrained": str(tmp_path / "vit.pth")}))
    d = write_vit(tmp_path / "published", timm_layout=False)
    put_in_hub_cache(d, cache, get_pretrained_cfg(name).hf_hub_id)
    model = RAHF.from_pretrained_encoders(tiny(vision={"pretrained": name}))
    assert model.config.vision.mean == tuple(get_pretrained_cfg(name).mean)
    file = load_file(str(d / "model.safetensors"))
    assert all(torch.equal(v, file[k]) for k, v in model.vision.state_dict().items())


# ----------------------------------------------------------------------------- random init, the trainer
def test_big_presets_refuse_random_encoders_unless_asked():
    with pytest.raises(ConfigError) as err:
        check_random_init(RAHFConfig.preset("paper"))
    msg = str(err.value)
    assert "model.text.pretrained" in msg and "model.vision.pretrained" in msg and "allow_random_init=true" in msg
    with pytest.raises(ConfigError, match="random vision weights: set model.vision.pretrained "):
        check_random_init(RAHFConfig.preset("large384", text={"pretrained": "/models/t5-base"}))
    check_random_init(RAHFConfig.preset("paper", allow_random_init=True))
    check_random_init(RAHFConfig.preset("paper", text={"pretrained": "t5-base"},
                                        vision={"pretrained": "v.safetensors"}))
    check_random_init(RAHFConfig.preset("tiny"))


def test_the_trainer_refuses_before_touching_data_or_building(tmp_path, capsys):
    # (without the check, the build would stop at the missing data instead, with another error)
    args = ["model.preset=paper", f"data.root={tmp_path / 'data'}", "data.generate_synth=false",
            f"run.output_dir={tmp_path / 'runs'}", "run.name=r", "tracking.tracker=none"]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="allow_random_init"):
        Trainer(resolve_config(None, args)).build()
    assert time.perf_counter() - start < 10  # no ViT-B + T5-base was built
    capsys.readouterr()
    assert train_main([*args, "run.name=r2"]) == 2
    err = capsys.readouterr().err
    assert "config error: model.preset='paper' would train with random text and vision weights" in err


def test_a_trained_checkpoint_of_a_big_preset_loads_without_the_check(tmp_path):
    cfg = tiny().replace(preset="paper")  # a paper-named config of tiny size, saved as a trained model is
    RAHF(cfg).save_pretrained(tmp_path / "ckpt")
    assert RAHF.from_pretrained(tmp_path / "ckpt").config.preset == "paper"


def test_the_trainer_builds_from_pretrained_encoders_and_normalises_with_their_mean_std(
        synth_root, t5_dirs, vit_dir, tmp_path):
    args = [f"data.root={synth_root}", f"run.output_dir={tmp_path}", "run.name=pre", "tracking.tracker=none",
            "data.num_workers=0", "train.threads=1", "model.text.num_layers=1",  # the checkpoint's 2 wins
            f"model.text.pretrained={t5_dirs['flan_t5']}", f"model.vision.pretrained={vit_dir}"]
    trainer = Trainer(resolve_config(None, args))
    trainer.build()
    model = trainer.unwrapped
    assert trainer.cfg.model is model.config and model.config.text.num_layers == 2
    assert (trainer.train_ds.mean, trainer.train_ds.std) == (VIT_MEAN, VIT_STD)
    t5, vit = model.t5.state_dict(), model.vision.state_dict()
    assert all(torch.equal(t5[k], v.float()) for k, v in checkpoint_tensors(t5_dirs["flan_t5"]).items())
    file = load_file(str(vit_dir / "model.safetensors"))
    assert all(torch.equal(v, file[k]) for k, v in vit.items())
