"""The training configuration: one set of defaults, YAML files that list only what differs from them,
and head styles recorded in the resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rahf.configtools import ConfigError, to_dict
from rahf.model.config import RAHFConfig
from rahf.training.config import TrainConfig, default_config_path, resolve_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _leaves(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out += _leaves(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
    return out


def _without(d: dict, path: tuple) -> dict:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    node = d
    for k in path[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    del node[path[-1]]
    return d


def test_default_job_is_the_defaults_with_the_prompt_reading_switches():
    assert TrainConfig().model == RAHFConfig() == RAHFConfig.preset("tiny")
    assert default_config_path().name == "default.yaml"
    cfg = resolve_config(str(default_config_path()))
    # the default job: the defaults, 960 steps under a safety time cap, the curriculum data, the tiny ViT with a
    # convolutional stem, a scene head and a word head, whose tags the evaluation reports, and score
    # heads that also read the prompt tokens
    base = TrainConfig()
    want = TrainConfig(
        train={**to_dict(base.train), "max_steps": 960, "time_limit_minutes": 9.0},
        eval={**to_dict(base.eval), "decode": "word_head", "every": 320},
        checkpoint={**to_dict(base.checkpoint), "every": 320},
        data={**to_dict(base.data), "curriculum": [1.0, 1.0, 0.6, 0.4, 0.3], "group_variants": False,
              "synth": {**to_dict(base.data.synth), "prompts_per_image": 2, "variant_pick": "balanced",
                        "easy_fraction": 0.4}},
        model=RAHFConfig.preset("tiny", vision={"stem": "conv"}, scene_head=True, word_head=True, score_text=True,
                                loss={"scene": 3.0, "word_tags": 2.0}))
    assert to_dict(cfg) == to_dict(want)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_list_only_what_differs_from_the_defaults(path, tmp_path):
    data = yaml.safe_load(path.read_text()) or {}
    full = to_dict(resolve_config(str(path)))
    assert data, path
    for leaf in _leaves(data):
        reduced = tmp_path / "reduced.yaml"
        reduced.write_text(yaml.safe_dump(_without(data, leaf)))
        try:
            without = to_dict(resolve_config(str(reduced)))
        except ConfigError:  # the leaf is needed by another one (eval.decode=word_head needs model.word_head)
            continue
        assert without != full, f"{path.name}: {'.'.join(leaf)} restates a default"


def test_head_style_in_the_resolved_config():
    assert resolve_config(None).model.head_style == "tiny"
    assert resolve_config(None, ["model.preset=paper"]).model.head_style == "light"
    cfg = resolve_config(None, ["model.preset=paper", "model.head_style=repro"])
    assert cfg.model.head_style == "repro" and cfg.model.heatmap_head.upsample == 1
    assert to_dict(cfg)["model"]["head_style"] == "repro"  # what config.yaml / config.json record
    cfg = resolve_config(None, ["model.head_style=light", "model.heatmap_head.upsample=2"])
    assert cfg.model.head_style == "custom" and cfg.model.heatmap_head.stem_channels == (384,)
    with pytest.raises(ConfigError, match="model.head_style: unknown style 'big'"):
        resolve_config(None, ["model.head_style=big"])
    with pytest.raises(ConfigError, match="unknown config key 'model.visoin'"):
        resolve_config(None, ["model.visoin.depth=2"])


def test_config_none_is_the_package_defaults(capsys, monkeypatch):
    from rahf.configtools import dump_yaml
    from rahf.training.trainer import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs/default.yaml is found from here
    assert main(["--config", "none", "--print-config"]) == 0
    assert capsys.readouterr().out.strip() == dump_yaml(TrainConfig()).strip()
    assert main(["--print-config"]) == 0
    assert capsys.readouterr().out.strip() == dump_yaml(resolve_config(str(default_config_path()))).strip()
    assert dump_yaml(resolve_config(str(default_config_path()))) != dump_yaml(TrainConfig())
