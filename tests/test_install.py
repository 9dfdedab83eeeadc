"""What each install gives: the base install scores and evaluates; a feature whose extra is missing
fails in one line naming the ``pip install "rahf[...]"``; light entry points do not load torch; the
test script stops in one line when it cannot install the browser.

Missing extras are simulated by blocking their modules (``sys.modules[name] = None`` makes ``import
name`` fail as if it were not installed), in this process with ``monkeypatch`` or, for a whole
command, in a fresh interpreter.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rahf._extras import MissingExtra, require
from rahf.cli import main

ROOT = Path(__file__).resolve().parents[1]
# modules of each extra that nothing in the base install imports (httpx is left out: some
# huggingface_hub versions depend on it themselves)
EXTRA_MODULES = {
    "train": ["wandb", "tensorboard"],
    "richhf": ["pyarrow", "google.protobuf", "google_crc32c"],
    "report": ["matplotlib"],
    "serve": ["fastapi", "uvicorn"],
}
ALL_EXTRA_MODULES = [m for ms in EXTRA_MODULES.values() for m in ms]
HEAVY = ["torch", "torchvision", "timm", "transformers", "accelerate"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_python(code: str, blocked=(), timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the ``blocked`` modules cannot be imported."""
    prelude = f"import sys\nfor _m in {list(blocked)!r}:\n    sys.modules[_m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def block(monkeypatch, *modules) -> None:
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def assert_one_line_naming(stderr: str, extra: str, module: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    hits = [line for line in stderr.splitlines() if "pip install" in line]
    assert len(hits) == 1, stderr[-3000:]
    assert f'pip install "rahf[{extra}]"' in hits[0] and module in hits[0], hits[0]


# ------------------------------------------------------------------------------------------ require
def test_require_names_the_extra_and_returns_the_module(monkeypatch):
    assert require("json", extra="report") is json
    block(monkeypatch, "matplotlib", "google.protobuf")
    with pytest.raises(MissingExtra) as e:
        require("matplotlib", extra="report", purpose="plots")
    assert str(e.value) == 'matplotlib is not installed (needed for plots): pip install "rahf[report]"'
    assert isinstance(e.value, ImportError) and e.value.name == "matplotlib"
    with pytest.raises(MissingExtra, match=r'^google\.protobuf is not installed: pip install "rahf\[richhf\]"$'):
        require("google.protobuf", extra="richhf")


def test_require_keeps_a_broken_librarys_own_error(tmp_path, monkeypatch):
    # an installed library that fails while importing itself is not reported as missing
    (tmp_path / "rahf_test_broken_lib.py").write_text("import rahf_test_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("rahf_test_broken_lib", extra="report")
    assert not isinstance(e.value, MissingExtra) and e.value.name == "rahf_test_no_such_dependency"


def _require_calls() -> list[tuple[str, str, str]]:
    calls = []
    for path in sorted((ROOT / "rahf").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r'require\(\s*(?:f?"([\w.{}]+)"|(\w+))\s*,\s*extra="(\w+)"', text):
            calls.append((str(path.relative_to(ROOT)), m.group(1) or m.group(2), m.group(3)))
    return calls


def test_every_required_module_comes_with_its_extra():
    """Each ``require(module, extra=...)`` names an extra of pyproject.toml that installs the module."""
    meta = importlib.metadata.metadata("rahf")
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"train", "richhf", "report", "serve", "all", "dev"} <= extras
    per_extra: dict[str, set] = {}
    for req in meta.get_all("Requires-Dist") or []:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+).*extra\s*==\s*['\"](\w+)['\"]", req)
        if m:
            per_extra.setdefault(m.group(2), set()).add(m.group(1).lower().replace("_", "-"))
    dists = importlib.metadata.packages_distributions()
    calls = _require_calls()
    assert {c[0] for c in calls} >= {"rahf/eval/report.py", "rahf/reward/cbm.py", "rahf/data/richhf.py",
                                     "rahf/data/tfrecord.py", "rahf/training/trainer.py", "rahf/cli/predict.py"}
    for where, module, extra in calls:
        assert extra in per_extra, f"{where}: extra {extra!r} is not declared in pyproject.toml"
        if module == "tracker":  # the trainer requires the tracker named in the config
            modules = EXTRA_MODULES["train"]
        else:
            modules = [module]
        for mod in modules:
            top = mod.split(".")[0]
            provided = {d.lower().replace("_", "-") for d in dists.get(top, [])}
            assert provided & per_extra[extra], f"{where}: {mod} is not installed by rahf[{extra}] ({provided})"


# ------------------------------------------------------------------------------------------ in this process
@pytest.fixture
def image_manifest(tmp_path):
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "a red cat"}) + "\n")
    return tmp_path / "m.jsonl"


@pytest.mark.parametrize("command", ["predict", "mask"])
def test_overlays_without_matplotlib_fail_in_one_line(command, ckpt, image_manifest, tmp_path, monkeypatch, capsys):
    block(monkeypatch, "matplotlib")
    out = tmp_path / "out"
    assert main([command, "--checkpoint", str(ckpt), "--manifest", str(image_manifest), "--out", str(out)]) == 1
    assert_one_line_naming(capsys.readouterr().err, "report", "matplotlib")
    assert not (out / "index.html").exists() and not (out / "masks.jsonl").exists()


def test_select_needs_no_extra(known_ckpt, image_manifest, tmp_path, monkeypatch):
    from known_model import SET_SCORES

    block(monkeypatch, *ALL_EXTRA_MODULES)
    out = tmp_path / "sel.json"
    argv = ["select", "--checkpoint", str(known_ckpt[1]), "--manifest", str(image_manifest), "--out", str(out)]
    assert main(argv) == 0
    sel = json.loads(out.read_text())
    assert len(sel["groups"]) == 1 and len(sel["kept"]) == 1
    assert sel["groups"][0]["candidates"][0]["scores"] == pytest.approx(SET_SCORES, abs=1e-5)
    # the hand-set overall score is 0.8: a threshold above it keeps nothing
    assert main([*argv, "--threshold", "0.81"]) == 0 and json.loads(out.read_text())["kept"] == []


def test_cbm_plots_without_matplotlib_fail_in_one_line(tmp_path, monkeypatch, capsys):
    rows = [{"a": float(i % 7), "y": int(i % 2)} for i in range(40)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    block(monkeypatch, "matplotlib")
    assert main(["cbm", "fit", "--table", str(tmp_path / "t.jsonl"), "--features", "a", "--target", "y",
                 "--out", str(tmp_path / "cbm")]) == 1
    assert_one_line_naming(capsys.readouterr().err, "report", "matplotlib")
    from rahf.reward.cbm import plot_curves

    with pytest.raises(MissingExtra, match=r'pip install "rahf\[report\]"'):
        plot_curves({"budgets": [], "curves": {}}, tmp_path / "c.png")


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_tracker_without_its_library_fails_in_one_line(tracker, synth_root, tmp_path, monkeypatch, capsys):
    block(monkeypatch, tracker)
    assert main(["train", f"data.root={synth_root}", f"run.output_dir={tmp_path}", "run.name=t",
                 f"tracking.tracker={tracker}", "data.generate_synth=false"]) == 1
    assert_one_line_naming(capsys.readouterr().err, "train", tracker)
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------------ fresh interpreters
def test_tfrecord_framing_needs_no_extra(tmp_path):
    """TFRecord framing and CRC-32C work without protobuf and google-crc32c (pure-python CRC); only
    decoding an Example needs the richhf extra."""
    r = run_python(f"""
        from rahf.data import tfrecord as t
        assert t.CRC32C_IMPLEMENTATION.startswith("pure python"), t.CRC32C_IMPLEMENTATION
        assert t.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
        with t.TFRecordWriter({str(tmp_path / "a.tfrecord")!r}) as w:
            w.write(b"abc")
            w.write(b"")
        print([d for _, d in t.iter_tfrecord({str(tmp_path / "a.tfrecord")!r})])
        try:
            t.decode_example(b"")
        except ImportError as e:
            print("ERR", e)
    """, blocked=ALL_EXTRA_MODULES)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "[b'abc', b'']"
    assert lines[1] == ('ERR google.protobuf is not installed (needed for reading RichHF-18K TFRecords): '
                        'pip install "rahf[richhf]"')


def test_import_rahf_and_cli_without_torch():
    r = run_python(f"""
        import rahf, rahf.cli
        print(sorted(m for m in {HEAVY + ALL_EXTRA_MODULES!r} if sys.modules.get(m) is not None))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", f"import rahf, rahf.cli loaded {r.stdout.strip()}"


def test_help_without_torch():
    r = run_python(f"""
        import contextlib, io
        from rahf.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main(["--help"])
            except SystemExit:
                pass
        assert "predict" in out.getvalue()
        print(sorted(m for m in {HEAVY + ALL_EXTRA_MODULES!r} if sys.modules.get(m) is not None))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", f"rahf --help loaded {r.stdout.strip()} (a command's register() imports them)"


# commands that need an extra: (extra, module named in the message, argv)
NEEDS_EXTRA = {
    "eval-report": ("report", "matplotlib", ["eval", "--checkpoint", "{ckpt}", "--data", "{data}", "--batch-size", "8",
                                             "--max-batches", "1", "--num-workers", "0", "--report", "{tmp}/report"]),
    "predict": ("report", "matplotlib", ["predict", "--checkpoint", "{ckpt}", "--image", "{tmp}/x.png",
                                         "--prompt", "a cat", "--out", "{tmp}/pred"]),
    "convert-richhf": ("richhf", "google.protobuf", ["data", "convert-richhf", "--tfrecords", "{tmp}",
                                                     "--images", "{tmp}", "--out", "{tmp}/richhf"]),
    "train-wandb": ("train", "wandb", ["train", "data.root={data}", "run.output_dir={tmp}/runs",
                                       "tracking.tracker=wandb"]),
}


@pytest.mark.slow
def test_base_install_scores_evaluates_and_names_missing_extras(ckpt, synth_root, tmp_path):
    """In one interpreter with every extra's modules blocked: the scorer gives the same scores and
    tagged prompt as here, ``rahf eval`` writes its metrics, and each command that needs an extra
    exits 1 with one line naming it."""
    from rahf import RAHFScorer

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    im.save(tmp_path / "x.png")
    want = RAHFScorer.from_pretrained(ckpt, device="cpu").score([im], ["a red cat on a blue mat"])[0]
    out = tmp_path / "m.json"
    failing = {name: [a.format(ckpt=ckpt, data=synth_root, tmp=tmp_path) for a in argv]
               for name, (_, _, argv) in NEEDS_EXTRA.items()}
    r = run_python(f"""
        import contextlib, io, json
        from rahf import RAHFScorer
        from rahf.cli import main
        res = RAHFScorer.from_pretrained({str(ckpt)!r}, device="cpu").score([{str(tmp_path / "x.png")!r}],
                                                                         ["a red cat on a blue mat"])[0]
        print("SCORES", json.dumps(res.scores))
        print("TAGGED", res.tagged_prompt)
        rc = main(["eval", "--checkpoint", {str(ckpt)!r}, "--data", {str(synth_root)!r}, "--split", "test",
                   "--batch-size", "8", "--max-batches", "1", "--num-workers", "0", "--out", {str(out)!r}])
        print("EVAL", rc)
        for name, argv in {failing!r}.items():
            with contextlib.redirect_stderr(io.StringIO()) as err:
                rc = main(argv)
            print("FAIL", json.dumps({{"name": name, "rc": rc, "stderr": err.getvalue()}}))
    """, blocked=ALL_EXTRA_MODULES)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("SCORES", "TAGGED", "EVAL", "FAIL"))]
    one = {k: v for k, v in lines if k != "FAIL"}
    got = json.loads(one["SCORES"])
    assert got.keys() == want.scores.keys()
    assert all(abs(got[k] - want.scores[k]) < 1e-5 for k in got)
    assert one["TAGGED"] == want.tagged_prompt
    assert one["EVAL"] == "0"
    assert "score/plcc/overall" in out.read_text()
    fails = {d["name"]: d for d in (json.loads(v) for k, v in lines if k == "FAIL")}
    assert fails.keys() == NEEDS_EXTRA.keys()
    for name, (extra, module, _) in NEEDS_EXTRA.items():
        assert fails[name]["rc"] == 1, fails[name]
        assert_one_line_naming(fails[name]["stderr"], extra, module)
    assert not (tmp_path / "pred" / "index.html").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ scripts/test.sh
def test_test_script_stops_in_one_line_without_a_browser(tmp_path):
    """Without chromium and without a way to install it (no apt-get on PATH), scripts/test.sh
    prints one line saying what to install and runs no test."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id"):
        src = next((Path(d) / tool for d in os.environ["PATH"].split(os.pathsep) if (Path(d) / tool).is_file()), None)
        assert src is not None, f"{tool} not found"
        (bin_dir / tool).symlink_to(src)
    (bin_dir / "python").write_text(f'#!{bin_dir / "bash"}\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in ENV.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = str(bin_dir)
    r = subprocess.run([str(bin_dir / "bash"), str(ROOT / "scripts/test.sh"), "--collect-only"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "", (r.stdout[-2000:], r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "chromium" in lines[0] and "apt-get install chromium" in lines[0], r.stderr
