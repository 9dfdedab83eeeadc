"""Token limits are never silent, and the encoder can read the prompt as written.

The collator cuts a prompt over ``max_prompt_tokens`` and a target over ``max_target_tokens`` exactly
as the tokenizer's own truncation does, and marks each cut; ``rahf data validate`` reports the length
percentiles; a training run prints and records (training.json) what it cuts, and an evaluation
counts the cut texts in metrics.json. The optional manifest field ``prompt_raw`` (filled by the
RichHF converter) is what the encoder reads when ``model.text.encoder_prompt`` is ``original``;
datasets without it load as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RAHF, RAHFConfig, RAHFScorer
from rahf.cli import main as rahf_main
from rahf.data.format import DataError, SplitWriter, check_entry, open_dataset, write_dataset_info
from rahf.data.tokens import length_summary, token_counts
from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset
from rahf.data.validate import token_lengths
from rahf.eval.evaluate import run_evaluation
from rahf.model.tokenizer import load_tokenizer

from rahf.data.richhf import REPORT_NAME
from test_decoding import sentencepiece_dir
from test_richhf import CAPTIONS, richhf, run_cli  # noqa: F401  (richhf: the converter's fixture)
from test_train import small

PROMPTS = ["a yellow cat on a red mat", "star", "two green triangles above a big star and a small red circle",
           "Zebra qux cat"]
TAGGED = ["a yellow_0 cat on a red_0 mat", "star_0", "two green_0 triangles_0 above a big star and a small red circle",
          "Zebra qux_0 cat"]


@pytest.fixture(scope="module", params=["words", "byt5", "sentencepiece"])
def tokenizer(request, tmp_path_factory):
    spec = sentencepiece_dir(tmp_path_factory) if request.param == "sentencepiece" else request.param
    return load_tokenizer(spec)


def items(prompts, tagged, raws=None):
    raws = raws or [None] * len(prompts)
    return [{"index": i, "uid": f"u{i}", "prompt": p, "prompt_raw": r, "tagged_prompt": t,
             "pixel_values": torch.zeros(3, 8, 8), "scores": torch.zeros(4),
             "implausibility_map": torch.zeros(4, 4), "misalignment_map": torch.zeros(4, 4)}
            for i, (p, t, r) in enumerate(zip(prompts, tagged, raws))]


def test_collator_cuts_like_the_tokenizer_and_marks_each_cut(tokenizer):
    prompt_len = token_counts(tokenizer, PROMPTS)
    target_len = token_counts(tokenizer, TAGGED)
    for limit in sorted({3, prompt_len[0], max(prompt_len) - 1}):  # one at exactly a prompt's length
        c = RAHFCollator(tokenizer, max_prompt_tokens=limit, max_target_tokens=limit + 1)
        batch = c(items(PROMPTS, TAGGED))
        ref = tokenizer(PROMPTS, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        assert torch.equal(batch["input_ids"], ref["input_ids"])
        assert torch.equal(batch["attention_mask"], ref["attention_mask"])
        assert batch["prompt_truncated"].tolist() == [n > limit for n in prompt_len]
        assert batch["target_truncated"].tolist() == [n > limit + 1 for n in target_len]
        ref_t = tokenizer(TAGGED, padding=True, truncation=True, max_length=limit + 1, return_tensors="pt")
        assert torch.equal(batch["labels"], ref_t["input_ids"].masked_fill(ref_t["attention_mask"] == 0, -100))
        assert batch["input_ids"].shape[1] <= limit
        # the cut keeps the end-of-sequence token
        eos = tokenizer.eos_token_id
        for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
            assert row[int(mask.sum()) - 1] == eos
    info = RAHFCollator(tokenizer, 5, 6).truncation(PROMPTS, TAGGED)
    assert info["prompt"]["over_limit"] == sum(n > 5 for n in prompt_len)
    assert info["target"]["over_limit"] == sum(n > 6 for n in target_len)
    assert info["prompt"]["max"] == max(prompt_len) and info["prompt"]["n"] == len(PROMPTS)


def test_length_summary_percentiles_are_observed_lengths():
    counts = list(range(1, 101))  # 1..100
    s = length_summary(counts, limit=95)
    assert (s["p50"], s["p90"], s["p99"], s["max"]) == (50, 90, 99, 100)
    assert s["over_limit"] == 5 and s["n"] == 100 and s["mean"] == 50.5
    s = length_summary([7, 3, 3])
    assert (s["p50"], s["p90"], s["max"]) == (3, 7, 7) and "over_limit" not in s
    assert length_summary([])["max"] is None


RAW = {"u0": "A yellow cat, on a red mat!", "u1": "star"}  # u1: nothing to keep (= the clean prompt)


@pytest.fixture()
def raw_dataset(tmp_path):
    """Two records written with their captions as written; the converter's form of a manifest."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    with SplitWriter(root, "test") as w:
        for uid, raw in RAW.items():
            words = raw.replace(",", " ").replace("!", " ").split()
            prompt = " ".join(words)
            w.add(uid, prompt, " ".join(x + "_0" if i == 1 else x for i, x in enumerate(words)),
                  {"plausibility": 0.5, "alignment": 0.5, "aesthetics": 0.5, "overall": 0.5},
                  Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                  np.zeros((16, 16)), np.zeros((16, 16)), prompt_raw=raw)
    write_dataset_info(root, splits={"test": 2})
    return root


def test_prompt_raw_is_optional_and_checked(raw_dataset):
    lines = [json.loads(x) for x in (raw_dataset / "test" / "manifest.jsonl").read_text().splitlines()]
    assert lines[0]["prompt_raw"] == RAW["u0"] and "prompt_raw" not in lines[1]
    ds = open_dataset(raw_dataset, "test")
    assert ds[0].prompt_raw == RAW["u0"] and ds[1].prompt_raw is None
    assert ds[0].encoder_prompt("original") == RAW["u0"] and ds[0].encoder_prompt("clean") == ds[0].prompt
    bad = dict(lines[0], prompt_raw="A yellow dog, on a red mat!")
    with pytest.raises(DataError, match="prompt_raw's words do not match prompt"):
        check_entry(bad)
    with pytest.raises(DataError, match="'prompt_raw' must be a string"):
        check_entry(dict(lines[0], prompt_raw=3))
    assert rahf_main(["data", "validate", str(raw_dataset)]) == 0


def test_encoder_reads_the_original_prompt_when_asked(raw_dataset):
    tok = load_tokenizer("words")
    ds = RAHFTorchDataset(open_dataset(raw_dataset, "test"), 32, None)
    batch_items = [ds[0], ds[1]]
    original = RAHFCollator(tok, 40, 48, encoder_prompt="original")(batch_items)
    clean = RAHFCollator(tok, 40, 48)(batch_items)
    want = tok([RAW["u0"], "star"], padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(original["input_ids"], want)
    assert not torch.equal(original["input_ids"][0], clean["input_ids"][0])
    assert original["prompts"] == clean["prompts"] == ["A yellow cat on a red mat", "star"]  # decoding and labels
    assert torch.equal(original["labels"], clean["labels"])
    # the setting travels with the model (config.json) and reaches the scorer, which reads what was written
    cfg = RAHFConfig.preset("tiny", vision={"img_size": 32, "depth": 1}, text={"encoder_prompt": "original"})
    assert RAHFConfig.from_dict(cfg.to_dict()).text.encoder_prompt == "original"
    old = cfg.to_dict()
    del old["text"]["encoder_prompt"]  # a config.json written before the field existed
    assert RAHFConfig.from_dict(old).text.encoder_prompt == "clean"
    torch.manual_seed(0)
    model = RAHF(cfg).eval()
    assert RAHFCollator.for_model(model).encoder_prompt == "original"
    scorer = RAHFScorer(model, device="cpu")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    got = scorer.score([image], RAW["u0"], decode=None)[0].scores
    as_written = scorer.predict([image], ["A yellow cat on a red mat"], decode=None, originals=[RAW["u0"]]).scores
    clean_only = scorer.predict([image], ["A yellow cat on a red mat"], decode=None).scores
    assert np.allclose(list(got.values()), as_written[0].numpy(), atol=1e-6)
    assert not np.allclose(as_written.numpy(), clean_only.numpy(), atol=1e-6)


def test_validate_reports_token_lengths(synth_root, capsys):
    assert rahf_main(["data", "validate", str(synth_root), "--split", "dev", "--tokenizer", "byt5"]) == 0
    out = capsys.readouterr().out
    prompts = [e["prompt"] for e in open_dataset(synth_root, "dev").entries]
    n = token_counts(load_tokenizer("byt5"), prompts)
    s = length_summary(n, 40)  # the default config's max_prompt_tokens
    assert "token lengths in tokenizer 'byt5'" in out
    assert (f"dev split: prompt tokens: p50 {s['p50']}, p90 {s['p90']}, p99 {s['p99']}, max {s['max']} (n 16); "
            f"{s['over_limit']} over the limit of 40") in out
    assert s["over_limit"] > 0 and f"warning: {s['over_limit']} of 16 dev prompts are longer than " \
                                   f"model.text.max_prompt_tokens=40 tokens" in out
    assert token_lengths(synth_root, load_tokenizer("byt5"), ["dev"], max_prompt_tokens=40)["dev"]["prompt"] == s
    assert rahf_main(["data", "validate", str(synth_root), "--tokenizer", "/no/such/tokenizer"]) == 2
    assert "cannot load tokenizer '/no/such/tokenizer'" in capsys.readouterr().err


@pytest.mark.slow
def test_training_and_evaluation_count_what_is_cut(synth_root, tmp_path, capsys):
    """A run with small token limits prints and records (training.json) how many training prompts and
    targets are cut; its test evaluation counts them in metrics.json; rahf eval does the same."""
    from rahf.training.trainer import main as train_main

    limits = ["model.text.max_prompt_tokens=10", "model.text.max_target_tokens=12", "eval.counterfactual_records=0"]
    assert train_main(["--config", "none", *small(synth_root, tmp_path, "cut", "train.max_steps=2", *limits)]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer("words")
    train = open_dataset(synth_root, "train").entries
    cut_p = sum(n > 10 for n in token_counts(tok, [e["prompt"] for e in train]))
    cut_t = sum(n > 12 for n in token_counts(tok, [e["tagged_prompt"] for e in train]))
    assert cut_p and cut_t
    assert f"warning: {cut_p} of {len(train)} train prompts are longer than model.text.max_prompt_tokens=10" in out
    assert f"warning: {cut_t} of {len(train)} train targets (tagged prompts) are longer than " \
           f"model.text.max_target_tokens=12" in out
    export = tmp_path / "cut" / "export"
    training = json.loads((export / "training.json").read_text())
    assert training["token_lengths"]["train"]["prompt"]["over_limit"] == cut_p
    assert training["token_lengths"]["train"]["target"]["over_limit"] == cut_t
    test = open_dataset(synth_root, "test").entries
    want_p = sum(n > 10 for n in token_counts(tok, [e["prompt"] for e in test]))
    want_t = sum(n > 12 for n in token_counts(tok, [e["tagged_prompt"] for e in test]))
    metrics = json.loads((export / "metrics.json").read_text())
    assert (metrics["count/truncated_prompts"], metrics["count/truncated_targets"]) == (want_p, want_t)
    # the evaluation loop counts on its own, batch by batch
    model = RAHF.from_pretrained(export).eval()
    ds = RAHFTorchDataset(open_dataset(synth_root, "test"), model.config.vision.img_size, None)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=RAHFCollator.for_model(model))
    ev = run_evaluation(model, loader, decode=None, heatmaps=False)
    assert (ev.metrics["count/truncated_prompts"], ev.metrics["count/truncated_targets"]) == (want_p, want_t)
    # rahf eval says so on stderr, with the counts
    capsys.readouterr()
    assert rahf_main(["eval", "--checkpoint", str(export), "--data", str(synth_root), "--split", "test",
                      "--decode", "none", "--counterfactual", "0"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {want_p} prompt(s) cut at model.text.max_prompt_tokens=10 and {want_t} tagged prompt(s)" in err


def test_converter_keeps_the_caption_and_reports_token_lengths(richhf, capsys):
    """convert-richhf: each record keeps its caption as written (prompt_raw, where it differs from the
    clean prompt), and the report holds each split's token lengths in the tokenizer given, against
    the config's limits, of the prompts as that config's encoder reads them."""
    tf, src, out = richhf
    paper = str(Path(__file__).parents[1] / "configs" / "paper.yaml")  # encoder_prompt: original, 128 / 192
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out, "--config", paper, "--tokenizer", "byt5") == 0
    console = capsys.readouterr().out
    test = {e["uid"]: e for e in open_dataset(out, "test").entries}
    assert test["f6"]["prompt_raw"] == CAPTIONS["f6"] and test["f6"]["prompt"] == "test image one"
    assert "prompt_raw" not in test["g7"]  # the caption is already clean
    report = json.loads((out / REPORT_NAME).read_text())
    tl = report["splits"]["test"]["token_lengths"]
    assert tl["tokenizer"] == "byt5" and tl["encoder_prompt"] == "original"
    byt5 = load_tokenizer("byt5")
    assert tl["prompt"] == length_summary(token_counts(byt5, [CAPTIONS["f6"], CAPTIONS["g7"]]), 128)
    assert tl["target"] == length_summary(token_counts(byt5, [e["tagged_prompt"] for e in test.values()]), 192)
    assert report["splits"]["train"]["token_lengths"]["prompt"]["n"] == report["splits"]["train"]["kept"]
    assert f"prompt tokens: p50 {tl['prompt']['p50']}" in console and "token lengths in 'byt5'" in console
