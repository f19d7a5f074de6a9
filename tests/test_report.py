"""`merv-fast results-table`: the README's performance table is generated from bench/results/, byte for byte."""

import json
import shutil
from pathlib import Path

import pytest

from merv_fast.cli import main
from merv_fast.measure.report import BEGIN, END, current_block, readme_table, results_files, splice

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_generated_from_the_results_files():
    """Re-rendering the committed results reproduces the README's block exactly (else: run
    `merv-fast results-table --write README.md`)."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    assert current_block(readme) == readme_table(ROOT / "bench" / "results")
    assert splice(readme, readme_table(ROOT / "bench" / "results")) == readme
    longest = max(len(line) for line in current_block(readme).splitlines()[1:])
    assert longest < 400, f"a README table line of {longest} characters"


def test_check_alone_checks_the_readme_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(f"{BEGIN}\nstale\n{END}\n")
    assert main(["results-table", "--results-dir", str(ROOT / "bench" / "results"), "--check"]) == 1
    assert "README.md: the performance table is stale" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == f"{BEGIN}\nstale\n{END}\n"  # --check never writes


def test_cli_round_trip(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    (results / "2026-01-01_cpu-2core_state.state.json").write_text("{}")  # bookkeeping, never a table row
    (results / "notes.json").write_text(json.dumps({"not": "a results file"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nstale hand-typed table\n{END}\nafter\n")

    assert main(["results-table", "--results-dir", str(results), "--write", str(readme), "--check"]) == 1
    assert main(["results-table", "--results-dir", str(results), "--write", str(readme)]) == 0
    first = readme.read_bytes()
    assert b"stale" not in first and first.startswith(b"# title\n\nbefore\n") and first.endswith(b"after\n")
    assert main(["results-table", "--results-dir", str(results), "--write", str(readme)]) == 0
    assert readme.read_bytes() == first  # idempotent
    assert main(["results-table", "--results-dir", str(results), "--write", str(readme), "--check"]) == 0

    assert main(["results-table", "--results-dir", str(results)]) == 0  # printed
    printed = capsys.readouterr().out
    assert readme_table(results) in printed
    assert [p.name for p in results_files(results)] == sorted(
        p.name for p in (ROOT / "bench" / "results").glob("*.json") if not p.name.endswith(".state.json"))
    rows = sum(len(json.loads(p.read_text())["results"]) for p in results_files(results))
    assert readme_table(results).count("\n| ") == rows + 1  # header + one line per row (the rule starts "|---")


def test_missing_markers_is_a_clear_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert main(["results-table", "--write", str(readme), "--results-dir", str(ROOT / "bench" / "results")]) == 2
    assert "markers" in capsys.readouterr().err


def test_empty_results_dir(tmp_path):
    assert "No results files" in readme_table(tmp_path)
    with pytest.raises(ValueError):
        splice("text", "table")
