"""benchmarks/accuracy.py: one run over several fine-tunes, the report and the README snippet."""

from __future__ import annotations

import importlib.util
import json

from tests.paths import REPO_ROOT, require_shared_data


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "accuracy_benchmark", REPO_ROOT / "benchmarks" / "accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_run_covers_both_demo_fine_tunes_and_labels_cut_reference():
    bench = _load_benchmark()
    args = bench.parse_args([])
    assert args.finetuned == ["demo-vangogh", "demo-vangogh-light"]
    assert args.reference_steps == 1000
    assert bench.reference_label(1000) == "CGI-DM, reference settings"
    assert "100 steps" in bench.reference_label(100)


def test_one_run_scores_every_fine_tune_and_writes_table_snippet(tmp_path, capsys):
    require_shared_data("wikiart-vangogh", "membership")
    bench = _load_benchmark()
    out, table, raw = tmp_path / "ACCURACY.md", tmp_path / "table.md", tmp_path / "acc.json"
    assert bench.main(["--methods", "loss", "pia", "--n-bootstrap", "0", "--no-flow",
                       "--out", str(out), "--table-out", str(table), "--json", str(raw)]) == 0
    capsys.readouterr()
    runs = json.loads(raw.read_text())["finetunes"]
    assert [r["finetuned"] for r in runs] == ["demo-vangogh", "demo-vangogh-light"]
    auc = {(r["finetuned"], row["method"]): row["auc"] for r in runs for row in r["rows"]}
    # The heavy fine-tune is easy for the loss attack; the light one is not.
    assert auc["demo-vangogh", "loss"] == 1.0
    assert auc["demo-vangogh-light", "loss"] < 0.9

    snippet = table.read_text()
    header = snippet.splitlines()[0]
    assert "`demo-vangogh` (1500 fine-tuning steps)" in header
    assert "`demo-vangogh-light` (200 fine-tuning steps)" in header
    assert "python -m benchmarks.accuracy --methods loss pia --n-bootstrap 0 --no-flow" in snippet
    report = out.read_text()
    assert snippet.splitlines()[2] in report  # the same main table heads the full report
    # PIA ranks members last on the heavy fine-tune and mostly first on the light one.
    assert auc["demo-vangogh", "pia"] < 0.2 and auc["demo-vangogh-light", "pia"] > 0.6


def test_the_flow_demo_pair_is_a_column_with_velocity_baselines(tmp_path, capsys):
    require_shared_data("wikiart-vangogh", "membership")
    bench = _load_benchmark()
    assert bench.parse_args([]).flow_pair == ["demo-flow-base", "demo-flow-vangogh"]
    out, table, raw = tmp_path / "ACCURACY.md", tmp_path / "table.md", tmp_path / "acc.json"
    assert bench.main(["--finetuned", "demo-vangogh", "--methods", "loss", "secmi",
                       "--n-bootstrap", "0", "--out", str(out), "--table-out", str(table),
                       "--json", str(raw)]) == 0
    capsys.readouterr()
    runs = json.loads(raw.read_text())["finetunes"]
    assert [(r["pretrained"], r["finetuned"], r["family"]) for r in runs] == [
        ("demo-base", "demo-vangogh", "ddpm"),
        ("demo-flow-base", "demo-flow-vangogh", "pixel-flow"),
    ]
    flow = runs[1]
    assert [row["method"] for row in flow["rows"]] == ["loss"]
    assert 0.5 < flow["rows"][0]["auc"] <= 1.0  # the velocity loss attack sees the fine-tune
    assert "flow-matching" in flow["refused"]["secmi"]
    header, _, _, secmi_row = table.read_text().splitlines()[:4]
    assert "`demo-flow-vangogh` (flow matching, 1500 fine-tuning steps, vs `demo-flow-base`)" \
        in header
    assert secmi_row.startswith("| secmi |") and secmi_row.count("refused") == 1
    assert "refused: SecMI is defined on a DDPM noise schedule" in out.read_text()


def test_report_flags_a_method_whose_direction_flips_between_fine_tunes():
    bench = _load_benchmark()

    def run(name: str, ci: list[float | None]) -> dict:
        return {"finetuned": name, "rows": [{"method": "pia", "auc_ci": ci},
                                            {"method": "loss", "auc_ci": [0.6, 1.0]}]}

    notes = [n for n in bench.across_finetunes([run("a", [0.0, 0.1]), run("b", [0.55, 0.95])])
             if n.startswith("- ")]
    assert len(notes) == 1 and notes[0].startswith("- pia: clearly above chance")
    assert bench.across_finetunes([run("a", [0.0, 0.1]), run("b", [0.45, 0.95])]) == []
    assert bench.across_finetunes([run("a", [None, None]), run("b", [0.55, 0.95])]) == []
