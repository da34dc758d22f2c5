"""Every measured number of README.md and bench/README.md is one a committed bench/results file holds
(`bench/check_readme.py`, claims in `bench/readme_claims.py`); and the check catches a number that drifts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import readme_claims
from bench.check_readme import check, check_text, measured, numbers, untracked

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _check_readme(text: str):
    return check_text(text, "README.md", readme_claims.CLAIMS["README.md"], readme_claims.NOT_MEASURED["README.md"])


def test_every_readme_number_matches_a_committed_result():
    problems = check()
    assert not problems, "README numbers without a matching committed result:\n" + "\n".join(map(str, problems))


def test_the_script_runs_as_ci_would_and_says_so():
    done = subprocess.run([sys.executable, "bench/check_readme.py"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every measured README number matches" in done.stdout


def test_a_quoted_number_that_differs_from_its_result_is_reported():
    roundtrip = json.loads((REPO / "bench/results/roundtrip.json").read_text())
    load_ms = roundtrip["result"]["rows"][0]["times_s"]["load"] * 1e3
    quoted = f"resnet18 load {load_ms:.0f} ms"
    assert quoted in README
    wrong = README.replace(quoted, f"resnet18 load {load_ms + 40:.0f} ms")
    problems = _check_readme(wrong)
    assert len(problems) == 1, problems
    assert problems[0].line == README[:README.index(quoted)].count("\n") + 1
    assert f"{load_ms + 40:.0f}" in problems[0].message and "roundtrip.json" in problems[0].message
    assert f"{load_ms:.6g}" in problems[0].message  # the value the file holds


def test_a_number_is_checked_as_precisely_as_it_is_printed():
    """The wsp row prints the 1 M threshold search in whole ms: the value rounded passes, one ms off does not."""
    value_ms = json.loads((REPO / "bench/results/wsp.json").read_text())["result"]["projection"][0]["threshold_s"] * 1e3
    quoted = f"1 M weights {round(value_ms)} ms"
    assert quoted in README
    for shown, ok in ((round(value_ms), True), (round(value_ms) + 1, False), (round(value_ms) - 1, False)):
        problems = _check_readme(README.replace(quoted, f"1 M weights {shown} ms"))
        assert (not problems) == ok, (shown, value_ms, problems)


def test_a_measured_number_without_a_claim_is_reported_and_a_setting_is_not():
    added = README + "\nHere resnet18 ran 12.5 % faster at `--budget 0.3` with 2.5e-3, on 2026-12-04, torch 2.14.1.\n"
    problems = _check_readme(added)
    assert [p.message.split(" in ")[0] for p in problems] == ["12.5 %"]
    assert "no results file backs it" in problems[0].message


def test_a_claim_whose_text_left_the_readme_is_reported():
    line = next(line for line in README.splitlines() if line.startswith("| roundtrip ("))
    problems = _check_readme(README.replace(line, "| roundtrip | removed |"))
    assert any("claim text not found" in p.message for p in problems), problems


def test_the_rule_for_what_is_measured():
    text = ("torch 2.14.1 on 2026-11-25 (#11), int8 and fp32, resnet18 at 64×64 and 128², widths ×16, budget 0.3, "
            "3 seeds; measured 0.56, 93 ms, 1.5×, ×1.5, 12 %, 2.4 hours")
    flagged = [n.text + n.unit for n in numbers(text) if measured(n)]
    assert flagged == ["0.56", "93ms", "1.5×", "1.5×", "12%", "2.4hours"]


def test_numbers_in_code_are_commands_but_a_code_comment_is_prose():
    text = "```\nonnxecc compress m.onnx --budget 0.35\nmake bench   # takes 2.4 hours\n```\nrun `--lr 0.125`\n"
    assert [n.text for n in numbers(text) if measured(n)] == ["2.4"]


def test_a_results_file_that_git_does_not_track_is_reported():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing says what is committed")
    assert untracked(["roundtrip.json", "no-such-results.json"]) == ["no-such-results.json"]
