"""The command line's contract on bad input: one line on stderr, exit code 2; valid JSON; the model's own trigger."""

from __future__ import annotations

import json
import re

import pytest

from cleansight_analysis import cli
from cleansight_analysis.plotting.style import pdf_content, save_figure


def _run(argv, capsys):
    """``cleansight ARGV`` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse exits; main() returns for everything else
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("trigger:")]
    assert len(lines) == 1, err
    assert re.match(r"cleansight [a-z-]+( [a-z-]+)?: error: ", lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, says", [
    (["analyze", "stealing", "--model", "tiny-llava/badnet", "--out", "OUT", "--layers", "1,x"],
     "--layers: expected comma-separated integers"),
    (["analyze", "perturb", "--model", "tiny-llava/badnet", "--out", "OUT", "--intensities", "abc"],
     "--intensities: expected comma-separated numbers in [0, 1]"),
    (["analyze", "perturb", "--model", "tiny-llava/badnet", "--out", "OUT", "--intensities", "0,2"],
     "intensities lie in [0, 1]"),
    (["analyze", "stealing", "--model", "tiny-llava/badnet", "--out", "FILE"], "is a file, not a folder"),
    (["analyze", "stealing", "--model", "nope", "--out", "OUT"], "--model 'nope' is neither a registered model"),
    (["figures", "--jobs", "0"], "--jobs: expected a positive integer, got '0'"),
    (["tiny", "build", "--no-reading", "--reuse-stage2", "X", "--out", "OUT"],
     "--reuse-stage2 cannot go with --no-reading"),
    (["figures", "--only", "zzz"], "no notebooks in"),
    (["figures", "--model", "nope"], "--model 'nope' is neither a registered model, a family"),
    (["eval-backdoor", "--model", "tiny-llava/badnet", "--n", "0"], "--n: expected a positive integer, got '0'"),
    (["eval-backdoor", "--model", "tiny-llava/badnet", "--attack", "badnet", "--location", "1,b"],
     "--location must be a corner name"),
    (["eval-backdoor", "--model", "tiny-llava/badnet", "--attack", "nosuch"], "nosuch"),
    (["eval-backdoor", "--model", "tiny-llava/badnet", "--json", "DIR"], "is a folder; give a file path"),
    (["calibrate", "--model", "tiny-llava/badnet", "--out", "EXISTING"], "pass --overwrite"),
    (["calibrate", "--model", "tiny-llava/badnet", "--quantile", "1.5", "--out", "OUT/c.json"],
     "--quantile: expected a number in [0, 1]"),
    (["backdoor", "--base", "tiny-llava/clean", "--attack", "badnet", "--poison-rate", "nan", "--out", "OUT"],
     "expected a finite number"),
    (["evaluate", "--model", "tiny-llava/badnet", "--defense", "st", "--calibration", "EXISTING"],
     "use it with --defense cleansight"),
    (["evaluate", "--model", "tiny-llava/badnet", "--calibration", "EXISTING"], "CleanSight.load"),
    (["tables", "--out", "OUT", "--models", "badnet,,sig"], "expected comma-separated names"),
    (["analyze", "perturb", "--model", "tiny-llava/badnet", "--out", "WITH_TABLE"], "already holds perturb.parquet"),
    (["tables", "--out", "WITH_TABLE2"], "already holds table1_asr_cu.parquet"),
    (["backdoor", "--base", "tiny-llava/clean", "--attack", "badnet", "--n", "8", "--out", "NONEMPTY"],
     "already exists and is not empty"),
    (["backdoor", "--base", "tiny-llava/clean", "--attack", "badnet", "--n", "8", "--out", "NONEMPTY",
      "--resume"], "nothing to resume"),
    (["inspect", "--image", "no/such.png"], "does not exist"),
])
def test_bad_values_give_one_line_and_exit_code_2(argv, says, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "existing.json").write_text("{}")
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "with_table").mkdir()
    (tmp_path / "with_table" / "perturb.parquet").write_bytes(b"old")
    (tmp_path / "with_table2").mkdir()
    (tmp_path / "with_table2" / "table1_asr_cu.parquet").write_bytes(b"old")
    (tmp_path / "nonempty" / "card.json").write_text('{"name": "mine"}')
    subs = {"OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "a_file"), "DIR": str(tmp_path),
            "EXISTING": str(tmp_path / "existing.json"), "OUT/c.json": str(tmp_path / "out" / "c.json"),
            "NONEMPTY": str(tmp_path / "nonempty"), "WITH_TABLE": str(tmp_path / "with_table"),
            "WITH_TABLE2": str(tmp_path / "with_table2")}
    code, _, err = _run([subs.get(a, a) for a in argv], capsys)
    assert code == 2, err
    assert says in _one_error_line(err)


def test_json_output_is_strict_json_with_reasons_for_undefined_metrics():
    text = cli._json_text({"asr": float("nan"), "clean_acc": 0.5, "by_type": {"count": float("inf")}, "n": 3})
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    assert record["asr"] is None and record["by_type"]["count"] is None and record["clean_acc"] == 0.5
    assert set(record["undefined"]) == {"asr", "by_type.count"}
    assert "NaN" not in text and "Infinity" not in text


def test_eval_backdoor_keeps_the_cards_trigger_and_says_which(tmp_path, capsys):
    out = tmp_path / "deep" / "report.json"        # the folder is created
    code, stdout, err = _run(["eval-backdoor", "--model", "tiny-llava/badnet", "--attack", "badnet",
                              "--location", "top-left", "--n", "4", "--json", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["attack"]["size"] == 12           # the model's own 12 px patch, not the preset's 3 px
    assert report["attack"]["location"] == "top-left"
    assert "trigger:" in err and "from the model card, with location from the command line" in err
    assert json.loads(stdout) == report


def test_explicit_trigger_fields_override_the_card_one_by_one(capsys):
    card = {"attack": {"name": "badnet", "size": 4, "location": "top-left", "pattern": "mean_noise",
                       "pattern_seed": 42, "target": "t t t"}}
    args = cli.build_parser().parse_args(["eval-backdoor", "--model", "m", "--size", "6"])
    attack = cli._attack_from_args(args, card, announce=True)
    assert (attack.size, attack.location, attack.target, attack.pattern_seed) == (6, "top-left", "t t t", 42)
    assert "with size from the command line" in capsys.readouterr().err
    other = cli.build_parser().parse_args(["eval-backdoor", "--model", "m", "--attack", "blended"])
    assert cli._attack_from_args(other, card).name == "blended"   # another attack: its preset


def test_models_list_prints_names_literally(monkeypatch, capsys):
    from cleansight_analysis.models import registry

    monkeypatch.setitem(registry._REGISTRY, "[bold red]x[/]y", registry.RegisteredModel(
        "[bold red]x[/]y", "", path=registry.MODELS_DIR, card={"name": "[bold red]x[/]y", "attack": {"name": "[/]"}}))
    code, out, err = _run(["models", "list"], capsys)
    assert code == 0, err
    assert "[bold red]x[/]y" in out and "[/]" in out


def test_pdf_with_signed_zero_noise_is_not_rewritten(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    png, pdf = save_figure(fig, tmp_path / "f")
    # what another CPU may write: the same drawing with one coordinate as -0 (recompressed stream)
    import zlib

    data = pdf.read_bytes()
    streams = list(re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, flags=re.S))
    body = zlib.decompress(streams[0].group(1))
    noisy_body = re.sub(rb"(?<![\d.])0 0 m", b"-0 0 m", body, count=1) if b"0 0 m" in body else b"-0 " + body
    noisy = data[:streams[0].start(1)] + zlib.compress(noisy_body) + data[streams[0].end(1):]
    assert pdf_content(noisy) == pdf_content(data) and noisy != data
    pdf.write_bytes(noisy)
    save_figure(fig, tmp_path / "f")
    assert pdf.read_bytes() == noisy                  # same drawing: left as it was
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "f")
    assert pdf_content(pdf.read_bytes()) != pdf_content(noisy)   # a real change is written
    plt.close(fig)


def _tiny_notebook(path, source):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, str(path))


def test_notebook_runs_are_quiet_and_a_failing_cell_is_one_line(tmp_path, capfd):
    from cleansight_analysis.notebooks import NotebookFailed, _execute

    _tiny_notebook(tmp_path / "ok.ipynb", "print(x + 1)")
    _execute(str(tmp_path / "ok.ipynb"), str(tmp_path / "ok.out.ipynb"), {"x": 2}, str(tmp_path))
    captured = capfd.readouterr()
    noise = captured.out + captured.err
    assert "without encryption" not in noise and "KeyboardInterrupt" not in noise, noise
    _tiny_notebook(tmp_path / "bad.ipynb", "raise ValueError('table is broken')")
    with pytest.raises(NotebookFailed) as err:
        _execute(str(tmp_path / "bad.ipynb"), str(tmp_path / "bad.out.ipynb"), {}, str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "bad.ipynb failed in cell" in message
    assert "ValueError: table is broken" in message and "bad.out.ipynb" in message


def test_inspect_csv_into_a_missing_folder_is_created(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "new" / "deeper" / "rows.csv"
    code, _, err = _run(["inspect", "--model", "tiny-random-llava", "--image", str(tmp_path / "red.png"),
                         "--csv", str(out)], capsys)
    assert code == 0, err
    import pandas as pd

    frame = pd.read_csv(out)
    assert {"layer", "head", "group", "mass"} <= set(frame.columns) and len(frame) > 0


def test_pdf_content_ignores_sub_hundredth_point_noise_only():
    def pdf(body: bytes) -> bytes:
        return b"%PDF-1.4\n1 0 obj\n<< /Length 9 >>\nstream\n" + body + b"\nendstream\nendobj\n"

    base = pdf(b"477.640916 94.393833 l 0 0 m /F1 12 Tf")
    assert pdf_content(base) == pdf_content(pdf(b"477.640916 94.393822 l -0 0 m /F1 12 Tf"))   # 1e-5 pt, -0
    assert pdf_content(base) != pdf_content(pdf(b"477.640916 94.493833 l 0 0 m /F1 12 Tf"))    # 0.1 pt moved
    assert pdf_content(base) != pdf_content(pdf(b"477.640916 94.393833 l 0 0 m /F1 14 Tf"))    # font size
