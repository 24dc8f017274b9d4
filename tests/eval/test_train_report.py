"""The training report beside the evaluation report: a model trained by ``longkit train`` (tiny-llama, 2 steps)
evaluated with ``longkit eval --model DIR`` gets a "Training" section (numbers + loss curve) in summary.json and
report.html, and ``longkit report RUN`` shows it again from the run directory alone."""

from __future__ import annotations

import json

import pytest

from longkit.cli import main
from longkit.eval.report import write_report
from longkit.runtime.train import TrainConfig, read_log, train


def _cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ex:
        main(argv)
    captured = capsys.readouterr()
    return ex.value.code, captured.out + captured.err


def docs_name(report):
    """The one data source of the tiny run (the docs fixture's directory name)."""
    (name,) = report["data"]["sources"]
    return name


@pytest.fixture(scope="module")
def trained(docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "model"
    train(TrainConfig(recipe="continual:lr=3e-3,warmup_ratio=0", model="tiny-llama", data=[str(docs)],
                      target_length=640, rope="linear:factor=2", steps=2, save_every=2, out=str(out),
                      precision="fp32", progress=False))
    return out


def test_eval_of_a_trained_model_reports_its_training(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert (trained / "loss.png").is_file()
    expected = json.loads((trained / "train_report.json").read_text())
    log = read_log(trained)
    run = tmp_path / "run"
    code, text = _cli(["eval", "--model", str(trained), "--task", "passkey", "--lengths", "512", "--depths", "0.5",
                       "--samples", "1", "--out", str(run)], capsys)
    assert code == 0, text

    # recorded in the run directory at evaluation time
    assert json.loads((run / "run.json").read_text())["training"] == expected
    assert (run / "train_loss.png").read_bytes() == (trained / "loss.png").read_bytes()

    training = json.loads((run / "summary.json").read_text())["training"]
    assert training["recipe"] == expected["recipe"] and training["rope"] == "linear:factor=2"
    assert training["target_length"] == 640 and training["steps"] == 2 and training["trained_window"] == 512
    assert training["tokens_seen"] == expected["tokens_seen"] == 2 * 640
    assert training["seconds_this_session"] == expected["seconds_this_session"] > 0
    assert (training["first_loss"], training["final_loss"]) == (log[0]["loss"], log[-1]["loss"])
    assert set(training["data_tokens"]) == {docs_name(expected)}
    page = (run / "report.html").read_text()
    assert "<h2>Training</h2>" in page and 'src="train_loss.png"' in page
    assert page.index("<h2>Training</h2>") < page.index("<h2>Summary</h2>")
    assert "tokens seen</td><td>1280</td>" in page.replace("<td class='meta'>", "<td>")

    # `longkit report RUN --out OTHER`: from the run directory alone (the model directory may be gone)
    other = tmp_path / "other"
    (trained / "train_report.json").rename(trained / "hidden.json")
    try:
        code, text = _cli(["report", str(run), "--out", str(other)], capsys)
    finally:
        (trained / "hidden.json").rename(trained / "train_report.json")
    assert code == 0, text
    assert json.loads((other / "summary.json").read_text())["training"] == training
    assert (other / "train_loss.png").read_bytes() == (trained / "loss.png").read_bytes()
    assert 'src="train_loss.png"' in (other / "report.html").read_text()

    # a run recorded before run.json carried the training: found in the model directory
    meta = json.loads((run / "run.json").read_text())
    del meta["training"]
    (run / "run.json").write_text(json.dumps(meta))
    (run / "train_loss.png").unlink()
    write_report(run)
    assert json.loads((run / "summary.json").read_text())["training"] == training
    assert (run / "train_loss.png").read_bytes() == (trained / "loss.png").read_bytes()

    # a model that was not trained here: no section, no curve
    (trained / "train_report.json").rename(trained / "hidden.json")
    try:
        (run / "train_loss.png").unlink()
        write_report(run)
    finally:
        (trained / "hidden.json").rename(trained / "train_report.json")
    assert json.loads((run / "summary.json").read_text())["training"] is None
    assert "<h2>Training</h2>" not in (run / "report.html").read_text() and not (run / "train_loss.png").exists()


def test_damaged_training_report_fails_before_any_sample(trained, tmp_path, capsys):
    good = (trained / "train_report.json").read_text()
    (trained / "train_report.json").write_text("{oops")
    try:
        code, text = _cli(["eval", "--model", str(trained), "--task", "passkey", "--lengths", "512", "--depths", "0.5",
                           "--samples", "1", "--out", str(tmp_path / "run")], capsys)
    finally:
        (trained / "train_report.json").write_text(good)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in text and len(errors) == 1, text
    assert "train_report.json: cannot read the training report" in errors[0]
    assert not (tmp_path / "run" / "samples.jsonl").exists()
