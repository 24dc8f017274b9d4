import json

from typer.testing import CliRunner

from longkit.cli import app, parse_lengths

runner = CliRunner()


def test_methods_json_lists_every_kind_with_parameters():
    out = runner.invoke(app, ["methods", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    names = {(d["kind"], d["name"]) for d in data}
    assert {("rope", "yarn"), ("rope", "linear"), ("attention", "eager")} <= names
    yarn = next(d for d in data if d["name"] == "yarn")
    assert {"name", "kind", "parameters", "paper"} <= set(yarn)
    assert any(p["name"] == "factor" and p["default"] == 2.0 for p in yarn["parameters"])


def test_methods_table_and_kind_filter():
    out = runner.invoke(app, ["methods", "--kind", "rope"])
    assert out.exit_code == 0 and "yarn" in out.stdout and "eager" not in out.stdout
    bad = runner.invoke(app, ["methods", "--kind", "ropes"])
    assert bad.exit_code == 2 and "valid kinds: rope, attention, kv, memory" in bad.output


def test_eval_on_a_tiny_model_writes_records_and_a_report(tmp_path):
    run = tmp_path / "run"
    out = runner.invoke(app, ["eval", "--model", "tiny-llama", "--lengths", "512,600", "--depths", "0.5",
                              "--task", "passkey", "--task", "perplexity", "--rope", "linear:factor=2", "--out", str(run)])
    assert out.exit_code == 0, out.output
    assert (run / "report.html").is_file() and (run / "summary.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["methods"] == ["baseline", "rope=linear:factor=2"]
    assert "report:" in out.stdout


def test_eval_bad_method_exits_2_with_valid_names(tmp_path):
    out = runner.invoke(app, ["eval", "--model", "tiny-llama", "--rope", "yarnn", "--out", str(tmp_path / "r")])
    assert out.exit_code == 2
    assert "valid rope methods: abf, default, dynamic, linear, llama3, longrope, ntk, yarn" in out.output


def test_report_of_a_missing_dir_exits_2(tmp_path):
    out = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "does not exist" in out.output


def test_parse_lengths():
    assert parse_lengths("4k,8K, 12000") == [4096, 8192, 12000]
    assert parse_lengths("1.5k") == [1536]


def test_eval_no_default_methods_runs_the_untouched_model_only(tmp_path):
    # e.g. a trained model directory: without the flag the main job's dynamic NTK x2 would be compared as well
    run = tmp_path / "run"
    out = runner.invoke(app, ["eval", "--model", "tiny-llama", "--lengths", "512", "--depths", "0.5", "--task", "passkey",
                              "--no-default-methods", "--no-report", "--out", str(run)])
    assert out.exit_code == 0, out.output
    methods = {json.loads(line)["method"] for line in (run / "samples.jsonl").read_text().splitlines()}
    assert methods == {"baseline"}
    none = runner.invoke(app, ["eval", "--model", "tiny-llama", "--no-default-methods", "--no-baseline",
                               "--out", str(tmp_path / "r2")])
    assert none.exit_code == 2, none.output
