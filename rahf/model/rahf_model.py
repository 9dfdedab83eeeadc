"""The RAHF model: timm ViT → linear → [image tokens ; prompt tokens] → T5 encoder → heads + T5 decoder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import timm
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from ..schema import MAP_NAMES, SCORE_NAMES, TASKS
from .config import RAHFConfig
from .heads import HeatmapHead, ScoreHead
from .tokenizer import decode_tagged, load_tokenizer


FREEZABLE = ("vision", "projection", "embeddings", "text_encoder", "decoder", "heads")


@dataclass
class RAHFOutput:
    """Model outputs. ``heatmaps[name]``: (B, H, W) in [0, 1]; ``scores``: (B, 4) in [0, 1] ordered as
    ``SCORE_NAMES``; ``logits``: (B, T, V) decoder logits when labels were given."""

    heatmaps: dict[str, torch.Tensor]
    scores: torch.Tensor
    logits: Optional[torch.Tensor] = None
    encoder_hidden: Optional[torch.Tensor] = field(default=None, repr=False)  # for generation
    encoder_mask: Optional[torch.Tensor] = field(default=None, repr=False)
    word_logits: Optional[torch.Tensor] = None  # (B, L) per prompt token, when the model has a word head
    scene_logits: Optional[torch.Tensor] = None  # (B, N, C) per patch, when the model has a scene head


class RAHF(nn.Module):
    """Rich Automatic Human Feedback model. ``RAHF(config)`` builds random weights, no I/O."""

    def __init__(self, config: RAHFConfig, tokenizer=None):
        super().__init__()
        config.validate()
        self.config = config
        self._tokenizer = tokenizer
        v, t = config.vision, config.text
        kw = {k: getattr(v, k) for k in ("embed_dim", "depth", "num_heads", "mlp_ratio") if getattr(v, k) is not None}
        patch = v.patch_size
        if v.stem != "patch":
            kw["embed_layer"] = conv_stem_embed(v.patch_size, kw.get("embed_dim") or _arch_embed_dim(v.arch),
                                                layer_norm=v.stem == "conv_ln")
            patch = 1  # the stem's output is already the patch grid: HybridEmbed projects each position
        self.vision = timm.create_model(v.arch, pretrained=False, img_size=v.img_size, patch_size=patch,
                                        num_classes=0, global_pool="", drop_path_rate=v.drop_path_rate, **kw)
        grid = self.vision.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise ValueError(f"non-square patch grid {grid}")
        self.grid = grid[0]
        self.num_prefix_tokens = getattr(self.vision, "num_prefix_tokens", 1)
        vocab = t.vocab_size or len(self.tokenizer)
        self.t5 = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
            num_decoder_layers=t.num_decoder_layers, num_heads=t.num_heads, dropout_rate=t.dropout_rate,
            feed_forward_proj=t.feed_forward_proj, relative_attention_num_buckets=t.relative_attention_num_buckets,
            relative_attention_max_distance=t.relative_attention_max_distance, layer_norm_epsilon=t.layer_norm_epsilon,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=t.tie_word_embeddings))
        if not t.tie_word_embeddings and self.t5.lm_head.weight is self.t5.shared.weight:
            _untie_lm_head(self.t5)
        self.projection = nn.Linear(self.vision.num_features, t.d_model)
        d = t.d_model
        if config.variant == "multi_head":
            self.heatmap_heads = nn.ModuleDict({m: HeatmapHead(d, config.heatmap_head) for m in MAP_NAMES})
            self.score_heads = nn.ModuleDict({s: ScoreHead(d, self.grid, config.score_head) for s in SCORE_NAMES})
        else:
            self.heatmap_head = HeatmapHead(d, config.heatmap_head)
            self.score_head = ScoreHead(d, self.grid, config.score_head)
        self.word_head = nn.Linear(d, 1) if config.word_head else None
        if config.scene_head:
            from ..data.synth import SCENE_CLASSES

            self.scene_head = nn.Linear(d, SCENE_CLASSES)
        else:
            self.scene_head = None
        if config.score_text:
            self.score_text = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(inplace=True), nn.Linear(d, len(SCORE_NAMES)))
            nn.init.zeros_(self.score_text[-1].weight)
            nn.init.zeros_(self.score_text[-1].bias)
        else:
            self.score_text = None

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        """The tokenizer named by ``config.text.tokenizer`` (built/loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.text.tokenizer)
        return self._tokenizer

    @property
    def heatmap_size(self) -> int:
        return self.config.heatmap_size

    # ------------------------------------------------------------------ encoding
    def _encode(self, pixel_values, input_ids, attention_mask, task_ids=None, task_mask=None):
        """Returns (fused hidden (B', S, d), mask (B', S), image feature maps (B', d, g, g), the projected
        image tokens before the fusion (B, N, d)); B' = B or T·B."""
        img = self.vision.forward_features(pixel_values)[:, self.num_prefix_tokens:]  # (B, N, Dv)
        img = self.projection(img)  # (B, N, d)
        B, N, d = img.shape
        txt = self.t5.shared(input_ids)  # (B, L, d)
        img_mask = attention_mask.new_ones(B, N)
        if self.config.variant == "multi_head":
            seq = torch.cat([img, txt], dim=1)  # (B, N+L, d)
            mask = torch.cat([img_mask, attention_mask], dim=1)
        else:
            if task_ids is None:
                raise ValueError("the augmented_prompt variant needs task_ids/task_mask (made by the collator)")
            T, Lp = task_ids.shape
            pre = self.t5.shared(task_ids)  # (T, Lp, d)
            seq = torch.cat([img.unsqueeze(0).expand(T, -1, -1, -1), pre.unsqueeze(1).expand(-1, B, -1, -1),
                             txt.unsqueeze(0).expand(T, -1, -1, -1)], dim=2).reshape(T * B, -1, d)  # (T·B, N+Lp+L, d)
            mask = torch.cat([img_mask.unsqueeze(0).expand(T, -1, -1), task_mask.unsqueeze(1).expand(-1, B, -1),
                              attention_mask.unsqueeze(0).expand(T, -1, -1)], dim=2).reshape(T * B, -1)
        hidden = self.t5.encoder(inputs_embeds=seq, attention_mask=mask).last_hidden_state
        fmap = hidden[:, :N].transpose(1, 2).reshape(hidden.shape[0], d, self.grid, self.grid)  # (B', d, g, g)
        return hidden, mask, fmap, img

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None,
                task_mask: Optional[torch.Tensor] = None, **_unused) -> RAHFOutput:
        """pixel_values (B, 3, S, S); input_ids/attention_mask (B, L); labels (B, T) with -100 padding."""
        hidden, mask, fmap, tokens = self._encode(pixel_values, input_ids, attention_mask, task_ids, task_mask)
        B = pixel_values.shape[0]
        if self.config.variant == "multi_head":
            heatmaps = {m: head(fmap) for m, head in self.heatmap_heads.items()}
            scores = torch.stack([self.score_heads[s].logits(fmap) for s in SCORE_NAMES], dim=1)  # (B, 4)
        else:
            nm, ns = len(MAP_NAMES), len(SCORE_NAMES)
            maps = self.heatmap_head(fmap[: nm * B])  # (2B, H, W)
            heatmaps = dict(zip(MAP_NAMES, maps.split(B)))
            scores = self.score_head.logits(fmap[nm * B:(nm + ns) * B]).view(ns, B).t()  # (B, 4)
            hidden, mask = hidden[(nm + ns) * B:], mask[(nm + ns) * B:]  # the keywords task
        if self.score_text is not None:  # the prompt tokens are the last L positions in both variants
            txt, m = hidden[:, -input_ids.shape[1]:], attention_mask[:, :, None].to(hidden.dtype)
            mean = (txt * m).sum(1) / m.sum(1).clamp_min(1.0)
            peak = txt.masked_fill(m == 0, torch.finfo(txt.dtype).min).amax(1)
            scores = scores + self.score_text(torch.cat([mean, peak], dim=-1)).to(scores.dtype)
        scores = torch.sigmoid(scores.float())
        word_logits = None
        if self.word_head is not None:  # the prompt tokens are the last L positions in both variants
            word_logits = self.word_head(hidden[:, -input_ids.shape[1]:]).squeeze(-1).float()  # (B, L)
        scene_logits = self.scene_head(tokens).float() if self.scene_head is not None else None
        logits = None
        if labels is not None:
            dec_in = self.t5._shift_right(labels)
            logits = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                             decoder_input_ids=dec_in).logits
        return RAHFOutput(heatmaps=heatmaps, scores=scores, logits=logits, encoder_hidden=hidden, encoder_mask=mask,
                          word_logits=word_logits, scene_logits=scene_logits)

    @torch.no_grad()
    def generate_ids(self, out: RAHFOutput, max_new_tokens: Optional[int] = None, **kw) -> torch.Tensor:
        """Free (greedy) generation of the tagged prompt from a forward pass's encoder states."""
        n = max_new_tokens or self.config.text.max_target_tokens
        return self.t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=out.encoder_hidden),
                                attention_mask=out.encoder_mask, max_new_tokens=n, do_sample=False, num_beams=1, **kw)

    @torch.no_grad()
    def generate_tagged(self, out: RAHFOutput, max_new_tokens: Optional[int] = None) -> list[str]:
        return decode_tagged(self.tokenizer, self.generate_ids(out, max_new_tokens))

    # ------------------------------------------------------------------ training helpers
    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part name (for freezing and per-part learning rates)."""
        groups: dict[str, list[nn.Parameter]] = {p: [] for p in FREEZABLE}
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                groups["vision"].append(p)
            elif name.startswith("projection."):
                groups["projection"].append(p)
            elif name.startswith(("t5.shared", "t5.encoder.embed_tokens", "t5.decoder.embed_tokens", "t5.lm_head")):
                groups["embeddings"].append(p)
            elif name.startswith("t5.encoder."):
                groups["text_encoder"].append(p)
            elif name.startswith("t5.decoder."):
                groups["decoder"].append(p)
            else:
                groups["heads"].append(p)
        return groups

    def freeze(self, parts) -> int:
        """Set ``requires_grad=False`` on the named parts (see ``FREEZABLE``); returns the count frozen."""
        groups = self.parts()
        n = 0
        for part in parts:
            if part not in groups:
                raise ValueError(f"unknown part {part!r}; choose from {list(groups)}")
            for p in groups[part]:
                p.requires_grad_(False)
                n += p.numel()
        return n

    def set_channels_last(self, enable: bool = True) -> None:
        """Run the heads' convs on channels-last (NHWC) activations (the default); weights keep their layout."""
        for mod in self.modules():
            if isinstance(mod, (HeatmapHead, ScoreHead)):
                mod.channels_last = enable

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        if enable:
            self.t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.t5.gradient_checkpointing_disable()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ pretrained encoders
    @classmethod
    def from_pretrained_encoders(cls, config: RAHFConfig, tokenizer=None) -> "RAHF":
        """The model to train: built with the T5 architecture of ``config.text.pretrained`` and the image
        mean/std of ``config.vision.pretrained`` (each value that differs from ``config`` is logged; the
        model's ``config`` records them), then both loaded in full (:mod:`rahf.model.pretrained`). Without
        pretrained encoders in ``config``: ``RAHF(config)``."""
        from .pretrained import log, resolve_pretrained

        config, changes = resolve_pretrained(config)
        model = cls(config, tokenizer=tokenizer)
        if config.vision.pretrained or config.text.pretrained:
            model.load_pretrained_encoders()
        for line in changes:
            log.warning("%s", line)
        if config.text.pretrained and config.text.tokenizer == "words":
            log.warning("model.text.tokenizer='words' with a pretrained T5: its embeddings were learnt for its own "
                        "tokenizer's ids; set model.text.tokenizer to the checkpoint (e.g. the same directory)")
        return model

    def load_pretrained_encoders(self, vision: Optional[str] = None, text: Optional[str] = None) -> None:
        """Load public ViT / T5 weights into this model, every tensor or none (the constructor never does I/O).

        ``vision``, ``text``: as ``model.vision.pretrained`` / ``model.text.pretrained`` (default: the config's;
        given ones are recorded there). The model must already have the T5 checkpoint's architecture (build it
        with :meth:`from_pretrained_encoders`); the ViT's mean/std are recorded in ``config.vision``. Both are
        checked before either is loaded: on :class:`~rahf.model.pretrained.PretrainedMismatchError` (naming
        what does not fit) the model is unchanged.
        """
        from .pretrained import (PretrainedMismatchError, model_text_settings, t5_config, t5_state_dict,
                                 text_settings, vision_source, vit_state_dict)

        v, t = self.config.vision, self.config.text
        text = text or t.pretrained
        source = vision_source(vision or v.pretrained, v.arch) if (vision or v.pretrained) else None
        if text:
            want, have = text_settings(t5_config(text)), model_text_settings(self)
            diff = [f"model.text.{k} (checkpoint {want[k]!r}, model {have[k]!r})" for k in want if want[k] != have[k]]
            if diff:
                raise PretrainedMismatchError(
                    f"pretrained T5 {text!r} does not fit the model: {', '.join(diff)}; build the model with "
                    f"RAHF.from_pretrained_encoders(config), which takes these from the checkpoint")
            if len(self.tokenizer) > want["vocab_size"]:
                raise PretrainedMismatchError(
                    f"pretrained T5 {text!r} has a vocabulary of {want['vocab_size']}, fewer than the tokenizer's "
                    f"{len(self.tokenizer)} (model.text.tokenizer={t.tokenizer!r}): use the checkpoint's tokenizer")
        t5_sd = t5_state_dict(self.t5, text) if text else None
        vit_sd = vit_state_dict(self.vision, source, allow_resize=v.allow_resize) if source is not None else None
        if t5_sd is not None:
            self.t5.load_state_dict(t5_sd, strict=True)
            t.pretrained = text
        if vit_sd is not None:
            self.vision.load_state_dict(vit_sd, strict=True)
            v.pretrained, v.mean, v.std = source.spec, source.mean, source.std

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, metadata: Optional[dict] = None, *,
                        metrics: Optional[dict] = None, model_card: bool = True) -> None:
        """Write ``config.json``, ``model.safetensors``, the tokenizer files and the model card ``README.md``
        (see :func:`rahf.model.card.write_model_card`) to ``directory``. ``metadata`` goes into the
        safetensors header (e.g. ``{"step": 1200}``); ``metrics`` (evaluation results) into ``metrics.json``
        and the card (else the card shows a ``metrics.json`` already in the directory)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["text"]["vocab_size"] = self.t5.config.vocab_size
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_model(self, str(d / "model.safetensors"), metadata={k: str(v) for k, v in (metadata or {}).items()})
        self.tokenizer.save_pretrained(str(d))
        if metrics is not None:
            (d / "metrics.json").write_text(json.dumps(dict(metrics), indent=2) + "\n")
        if model_card:
            from .card import write_model_card

            write_model_card(d, metrics=metrics)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: Optional[str | torch.device] = None, *,
                        revision: Optional[str] = None, cache_dir: Optional[str | os.PathLike] = None,
                        token: Optional[str | bool] = None, local_files_only: Optional[bool] = None) -> "RAHF":
        """Load a model saved by :meth:`save_pretrained` (safetensors only, no unpickling) from a local
        directory or a Hugging Face Hub repo id ``org/name`` / ``org/name@revision``.

        A local directory that exists always wins. Hub repos resolve through the Hugging Face cache
        (``cache_dir``, default ``HF_HUB_CACHE``); offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``)
        from the cache alone. ``token``: for private or gated repos. See :mod:`rahf.model.hub`.
        """
        from .hub import resolve_checkpoint

        d = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                               local_files_only=local_files_only)
        config = RAHFConfig.load(d / "config.json")
        tokenizer = load_tokenizer(str(d)) if (d / "tokenizer_config.json").is_file() else None
        model = cls(config, tokenizer=tokenizer)
        load_model(model, str(d / "model.safetensors"), strict=True, device=str(device or "cpu"))
        return model.to(device) if device is not None else model


def _untie_lm_head(t5: T5ForConditionalGeneration) -> None:
    """Give ``t5`` an ``lm_head`` of its own (T5 v1.1 / Flan-T5). transformers >= 5 ties it to the shared
    embedding whatever the config says (``tie_word_embeddings=False`` only turns off the output scaling)."""
    t5.lm_head.weight = nn.Parameter(t5.shared.weight.detach().clone())
    tied = getattr(t5, "all_tied_weights_keys", None)
    if isinstance(tied, dict):  # so that a later tie_weights() keeps it apart
        tied.pop("lm_head.weight", None)


def conv_stem_embed(patch_size: int, embed_dim: int, layer_norm: bool = False):
    """timm's patch-embedding factory for ``model.vision.stem=conv``: log2(patch_size) stride-2 3×3
    convolutions (BatchNorm + GELU between them, or LayerNorm2d over channels with ``layer_norm``; widths
    embed_dim/2^(n-1) … embed_dim), then timm's HybridEmbed 1×1 projection to ``embed_dim``: the patch grid
    of a ``patch_size`` ViT, convolutional features in each token. BatchNorm uses batch statistics in
    training and its running statistics in ``eval()`` mode (inference is batch-independent)."""
    from functools import partial

    try:
        from timm.layers import HybridEmbed, LayerNorm2d
        from timm.models.vision_transformer_hybrid import ConvStem
    except ImportError as e:  # older timm releases lack the stem's building blocks
        raise ImportError(f"model.vision.stem=conv needs a newer timm than {timm.__version__} (it uses timm's ConvStem "
                          f"and timm.layers.HybridEmbed): pip install -U timm") from e

    n = patch_size.bit_length() - 1
    stem = ConvStem(depth=n, channels=embed_dim, stride=(2,) * n, kernel_size=3,
                    norm_layer=LayerNorm2d if layer_norm else nn.BatchNorm2d, act_layer=nn.GELU)
    return partial(HybridEmbed, backbone=stem)


def _arch_embed_dim(arch: str) -> int:
    """The embedding width of timm architecture ``arch`` (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        return int(timm.create_model(arch, pretrained=False).embed_dim)
