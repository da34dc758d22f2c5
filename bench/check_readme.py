"""`python -m bench.check_readme` (or `python bench/check_readme.py`): every measured number that README.md and
bench/README.md quote is one that a committed results file holds.

Why: a number typed into prose drifts from the run that produced it — a quick run's value quoted as the full run's,
a setting changed since, a JSON never kept. So every measured number is tied, by a claim in
`bench/readme_claims.py`, to a value of a `bench/results/*.json` file, and this script checks, number by number:

- each claim's text is still in the document, and each number it marks (`{}`) equals its JSON value rounded as
  printed (`0.56` matches 0.555–0.565, `93 ms` matches 92.5–93.5);
- every number that looks measured (the rule in `measured`, documented in bench/README.md, "README numbers") is
  inside a claim's text or a setting's in `readme_claims.NOT_MEASURED`; any other is reported as unbacked;
- each results file a claim names is tracked by git (when run in a git checkout).

Exit 0 when everything matches, 1 with one line per problem (file:line, the number, what is wrong).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# A number as printed: digits, an optional fraction, an optional exponent (2.5e-3).
NUMBER = r"\d+(?:\.\d+)?(?:e[-+]?\d+)?"
_UNITS = r"%|ms|µs|us|s|min|minutes|h|hours|×|x|MB|GB|MiB|GiB|mJ"
_TOKEN = re.compile(rf"(?<![\w.\-/#])(×)?({NUMBER})(?![\w.]\d|[\w²³])(\s*)({_UNITS})?(?![\w/])")
# Units of measured quantities: a number written with one of them (or as a ratio ×N.N / N×) is a measurement.
MEASURE_UNITS = {"%", "ms", "µs", "us", "s", "min", "minutes", "h", "hours", "×", "x", "MB", "GB", "MiB", "GiB", "mJ"}


@dataclass(frozen=True)
class Number:
    """One number of the document: where it is, how it was printed."""

    text: str
    start: int
    end: int
    line: int
    unit: str

    @property
    def value(self) -> float:
        return float(self.text)

    @property
    def decimals(self) -> int:
        mantissa = self.text.lower().split("e")[0]
        return len(mantissa.split(".")[1]) if "." in mantissa else 0


def prose(text: str) -> str:
    """`text` with inline code, HTML comments, link targets and fenced code blanked (same length, same lines): a
    number there is a command, an option or a path, not a quoted result — except a `# comment` in a fenced block,
    which is prose (`make bench   # about 2.4 hours`)."""
    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    def code(m: re.Match) -> str:
        return "\n".join(line[:c.start()].translate(_BLANK) + line[c.start():] if (c := re.search(r"(?<=\s)#\s", line))
                         else line.translate(_BLANK) for line in m.group(0).split("\n"))

    text = re.sub(r"^```.*?^```", code, text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = re.sub(r"(`+).+?\1", blank, text, flags=re.S)
    return re.sub(r"\]\([^)]*\)", blank, text)


class _Blank(dict):
    def __missing__(self, key: int) -> int:
        return ord(" ")


_BLANK = _Blank()


def numbers(text: str) -> list[Number]:
    """The numbers of `text`'s prose, with their units. Not numbers here: versions (2.14.1), dates (2026-11-25),
    parts of names (int8, fp32, resnet18, x86-64, ResNet-50), sizes written 64×64 or 128², issue numbers (#11)."""
    out = []
    body = prose(text)
    for m in _TOKEN.finditer(body):
        if re.match(r"\d{4}-\d\d-\d\d", body[m.start(2):m.start(2) + 10]) or body[m.end(2):m.end(2) + 1] == "×" and \
                body[m.end(2) + 1:m.end(2) + 2].isdigit():
            continue
        unit = m.group(4) or ("×" if m.group(1) and "." in m.group(2) else "")  # ×16: a multiple, ×1.5: a ratio
        out.append(Number(m.group(2), m.start(2), m.end(2), text.count("\n", 0, m.start(2)) + 1, unit))
    return out


def measured(n: Number) -> bool:
    """The rule: a number is a measurement when it carries the unit of a measured quantity (%, ms, s, ×, GB, ...) or
    is written with two decimals or more (a ratio, an accuracy: 0.56, 0.9861). Not flagged: integers and one-decimal
    numbers without a unit — budgets (0.3), counts of things in the code, sizes, seeds, versions — and numbers in
    code spans, commands and links. A measured number the rule misses may still be claimed."""
    if "e" in n.text.lower():
        return False  # 2.5e-3: a setting's notation (learning rates, ρ)
    return n.unit in MEASURE_UNITS or n.decimals >= 2


# ---- claims ------------------------------------------------------------------------------------------------------
def template_regex(template: str) -> re.Pattern:
    """A claim's text as a regex: `{}` captures a number, any whitespace matches any whitespace (prose wraps)."""
    parts = []
    for i, piece in enumerate(template.split("{}")):
        if i:
            parts.append(f"({NUMBER})")
        parts.extend(r"\s+" if chunk.isspace() else re.escape(chunk) for chunk in re.split(r"(\s+)", piece) if chunk)
    return re.compile("".join(parts))


def lookup(data, path: str) -> float:
    """`path` into a results JSON: `result.rows[arch=resnet18].times_s.load`, `result.rows[2]`,
    `result.rows[model=digits_cnn,budget=0.3]` (the one element with those keys), `['a key.with dots']`, with an
    optional factor at the
    end: `*100` (a fraction printed as %), `*1e3` (seconds printed as ms), `/60`."""
    factor = 1.0
    m = re.fullmatch(r"(.+?)\s*([*/])\s*([0-9.e+-]+)", path)
    if m:
        path, factor = m.group(1), float(m.group(3)) if m.group(2) == "*" else 1 / float(m.group(3))
    node = data
    for step in re.findall(r"\['[^']*'\]|\[[^\]]*\]|[^.\[\]]+", path):
        inner = step[1:-1]
        if step.startswith("['"):
            node = node[inner[1:-1]]  # a key with dots or spaces: ['uniform_0.7_x16']
        elif step.startswith("["):
            node = node[int(inner)] if inner.lstrip("-").isdigit() else _select(node, inner)
        else:
            node = node[step]
    if isinstance(node, str) and re.fullmatch(NUMBER, node):
        node = float(node)  # budgets are kept as the user wrote them: "0.3"
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise TypeError(f"{path} is {json.dumps(node)[:60]}, not a number")
    return node * factor


def _select(items: list, condition: str):
    """The one element of `items` whose keys equal `condition` (`key=value,key=value`; numbers compared as numbers)."""
    wanted = dict(kv.split("=", 1) for kv in condition.split(","))

    def same(value, text: str) -> bool:
        if str(value) == text:
            return True
        try:
            return float(value) == float(text)
        except (TypeError, ValueError):
            return False

    hits = [item for item in items if all(same(item.get(k), v) for k, v in wanted.items())]
    if len(hits) != 1:
        raise KeyError(f"[{condition}] selects {len(hits)} elements, not one")
    return hits[0]


def matches(printed: str, value: float) -> bool:
    """`value` rounds to `printed` at the printed number of decimals (half a unit of the last digit either side);
    a number printed with an exponent (2.5e-3) must be that number."""
    if "e" in printed.lower():
        return math.isclose(value, float(printed), rel_tol=1e-9)
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - float(printed)) <= 0.5 * 10 ** -decimals + 1e-9


@dataclass(frozen=True)
class Problem:
    document: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.message}"


def _load(names, cache: dict, results: Path):
    """One results file's JSON, or {name: JSON} when a claim names several (`("a.json", "b.json")`)."""
    if not isinstance(names, str):
        return {n: _load(n, cache, results) for n in names}
    if names not in cache:
        cache[names] = json.loads((results / names).read_text(encoding="utf-8"))
    return cache[names]


def check_text(text: str, document: str, claims: Iterable[tuple], not_measured: Iterable[tuple] = (),
               results: Path = RESULTS) -> list[Problem]:
    """Every problem of one document's text: claims `(results file(s), template, values)` whose text is missing or
    whose numbers differ from their values, and measured numbers that no claim or `not_measured` entry marks."""
    problems, covered, cache = [], set(), {}

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def cover(m: re.Match) -> None:  # a claim's or a setting's text owns every number in it
        covered.update(range(m.start(), m.end()))

    for snippet, why in not_measured:
        found = list(template_regex(snippet).finditer(text))
        if not found:
            problems.append(Problem(document, 0, f"text of a setting not found ({why}; update "
                                                 f"bench/readme_claims.py): {snippet!r}"))
        for m in found:
            cover(m)
    for names, template, values in claims:
        regex = template_regex(template)
        if regex.groups != len(values):
            problems.append(Problem(document, 0, f"claim {template!r} marks {regex.groups} numbers but gives "
                                                 f"{len(values)} values"))
            continue
        found = list(regex.finditer(text))
        if not found:
            problems.append(Problem(document, 0, f"claim text not found (the text changed? update "
                                                 f"bench/readme_claims.py): {template!r}"))
            continue
        try:
            data = _load(names, cache, results)
        except (OSError, ValueError) as exc:
            problems.append(Problem(document, line_of(found[0].start()), f"{names}: cannot read it ({exc})"))
            continue
        for m in found:
            cover(m)
            for group, value_of in enumerate(values, start=1):
                printed, where = m.group(group), line_of(m.start(group))
                try:
                    value = value_of(data) if callable(value_of) else lookup(data, value_of)
                except Exception as exc:  # noqa: BLE001 — a claim that cannot be evaluated is a problem to report
                    problems.append(Problem(document, where, f"{printed}: {names} {value_of} — "
                                                             f"{type(exc).__name__}: {exc}"))
                    continue
                if not matches(printed, value):
                    problems.append(Problem(document, where, f"{printed} in {_context(text, m.start(group))!r}: "
                                                             f"{names} {value_of} holds {value:.6g}"))
    for n in numbers(text):
        if measured(n) and n.start not in covered:
            problems.append(Problem(document, n.line, f"{n.text}{n.unit and ' ' + n.unit} in "
                                                      f"{_context(text, n.start)!r}: no results file backs it"))
    return sorted(problems, key=lambda p: p.line)


def _context(text: str, pos: int, width: int = 40) -> str:
    return " ".join(text[max(0, pos - width):pos + width].split())


def untracked(names: Iterable[str], repo: Path = REPO) -> list[str]:
    """The results files among `names` that git does not track (none when this is not a git checkout)."""
    names = sorted(set(names))
    try:
        out = subprocess.run(["git", "ls-files", "--", *(f"bench/results/{n}" for n in names)], cwd=repo,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    tracked = {Path(p).name for p in out}
    return [n for n in names if n not in tracked]


def check(repo: Path = REPO) -> list[Problem]:
    """Every problem of the repository's documents against `bench/readme_claims.py` and `bench/results/`."""
    from bench import readme_claims

    problems, named = [], []
    for document, claims in readme_claims.CLAIMS.items():
        text = (repo / document).read_text(encoding="utf-8")
        problems += check_text(text, document, claims, readme_claims.NOT_MEASURED.get(document, ()),
                               repo / "bench" / "results")
        named += [n for names, _, _ in claims for n in ([names] if isinstance(names, str) else names)]
    problems += [Problem("bench/readme_claims.py", 0, f"bench/results/{name} is not committed (git add it)")
                 for name in untracked(named, repo)]
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s): README numbers without a matching committed result" if problems else
          "every measured README number matches a committed bench/results file")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # `python bench/check_readme.py` as well as `python -m bench.check_readme`
    sys.exit(main())
