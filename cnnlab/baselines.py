"""The registry of baselines: experiment presets whose header says what they must reproduce.

A baseline is a Hydra experiment preset (`conf/experiment/<name>.yaml`) whose opening comment
holds `key: value` lines (a value may go on over indented comment lines):

    # command: cnnlab-verify lenet5_fashion_mnist
    # source:  what it reproduces, with a reference
    # band:    91.3 +- 0.3 over seeds 0,1,2
    # compute: what the full tier costs, and where it was measured
    # quick:   80 +- 5 over seeds 0 with data.train_limit=5000 train.epochs=2

`band` is the full tier: the mean test accuracy (%) over those seeds must lie within mean +-
tolerance. `quick` is the tier CI runs: shorter, with the overrides after `with`, and its own
band. `cnnlab-verify` (experiments/verify.py) runs the tiers; `judge` decides pass or fail, and
`results_table` renders the README's table from the result records it writes.
"""

import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cnnlab.errors import ConfigError

TIERS = ("quick", "full")
KEYS = ("command", "source", "band", "compute", "quick")
_LINE = re.compile(r"^#\s?(\w+):\s*(.*)$")
_BAND = re.compile(
    r"^(?P<mean>\d+(?:\.\d+)?) \+- (?P<tol>\d+(?:\.\d+)?) over seeds (?P<seeds>\d+(?:,\d+)*)"
    r"(?: with (?P<overrides>.+))?$"
)


@dataclass(frozen=True)
class Band:
    """Expected mean test accuracy (%) +- tolerance over `seeds`, with the tier's overrides."""

    mean: float
    tol: float
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()

    @property
    def low(self) -> float:
        return self.mean - self.tol

    @property
    def high(self) -> float:
        return self.mean + self.tol

    def __str__(self) -> str:
        return f"{self.mean:g} +- {self.tol:g}% over {len(self.seeds)} seed(s)"


@dataclass(frozen=True)
class Baseline:
    name: str  # the preset's file name: experiment=<name>
    title: str  # the header's first line
    command: str
    source: str
    compute: str
    tiers: dict[str, Band]  # "full" and "quick"


def parse_band(text: str, where: str) -> Band:
    match = _BAND.match(text.strip())
    if not match:
        raise ConfigError(
            f"{where}: cannot read the band {text.strip()!r}; write it as "
            "'<mean> +- <tolerance> over seeds <s>,<s>[ with <key=value> ...]'"
        )
    seeds = tuple(int(s) for s in match["seeds"].split(","))
    overrides = tuple((match["overrides"] or "").split())
    return Band(float(match["mean"]), float(match["tol"]), seeds, overrides)


def read_header(path: Path) -> dict[str, str]:
    """The `key: value` lines of a YAML file's opening comment (continuations joined)."""
    fields: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = _LINE.match(line)
        if match and match[1] in KEYS:
            key = match[1]
            fields[key] = match[2].strip()
        elif key and line.startswith("#   "):  # an indented continuation of the last value
            fields[key] += " " + line[1:].strip()
        else:
            key = None
    return fields


def load_baseline(path: Path) -> Baseline | None:
    """The baseline that a preset declares, or None for a preset without a `band`."""
    fields = read_header(path)
    if "band" not in fields:
        return None
    missing = [k for k in KEYS if k not in fields]
    if missing:
        raise ConfigError(f"{path}: the baseline header lacks {', '.join(missing)}")
    lines = [line.lstrip("# ").strip() for line in path.read_text().splitlines()[:3]]
    title = next((line for line in lines if line and not line.startswith("@package")), path.stem)
    tiers = {"full": parse_band(fields["band"], f"{path} band")}
    tiers["quick"] = parse_band(fields["quick"], f"{path} quick")
    return Baseline(path.stem, title, fields["command"], fields["source"], fields["compute"], tiers)


def registry(experiment_dir: Path) -> dict[str, Baseline]:
    """Every baseline among the presets in `experiment_dir`, by name."""
    found = (load_baseline(path) for path in sorted(Path(experiment_dir).glob("*.yaml")))
    return {b.name: b for b in found if b is not None}


@dataclass
class Result:
    """One tier of one baseline, as `cnnlab-verify` measured it (written as JSON)."""

    baseline: str
    tier: str
    status: str  # pass | fail | error (the run did not finish) | unavailable (no data here)
    band: dict  # asdict(Band)
    accuracies: dict[str, float] = field(default_factory=dict)  # seed -> test accuracy (%)
    mean: float = math.nan
    std: float = math.nan
    wall_seconds: float = 0.0
    commit: str = ""  # of the checkout that trained it (`git describe --dirty`)
    date: str = ""  # when its training finished, UTC, ISO 8601
    machine: str = ""  # what trained it: "cpu, 2 cores", "gpu: NVIDIA H200"
    run_dir: str = ""
    message: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def judge(band: Band, accuracies: dict[int, float]) -> tuple[str, float, float]:
    """(pass | fail, mean, sample std) of test accuracies (%) against `band`; a missing seed
    fails."""
    values = [accuracies[s] for s in band.seeds if s in accuracies]
    if len(values) < len(band.seeds) or not all(map(math.isfinite, values)):
        return "fail", math.nan, math.nan
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return ("pass" if band.low <= mean <= band.high else "fail"), mean, std


def describe(result: Result) -> str:
    """One line: `PASS name (full): 91.32 +- 0.08% over seeds 0,1,2; band 91.0..91.6; 612 s`."""
    head = f"{result.status.upper()} {result.baseline} ({result.tier})"
    if result.status in ("error", "unavailable"):
        return f"{head}: {result.message}"
    band = Band(**{**result.band, "seeds": tuple(result.band["seeds"])})
    seeds = ",".join(result.accuracies)
    return (
        f"{head}: {result.mean:.2f} +- {result.std:.2f}% over seeds {seeds}; "
        f"band {band.low:g}..{band.high:g}%; {result.wall_seconds:.0f} s"
    )


MARKERS = ("<!-- verify:begin -->", "<!-- verify:end -->")


def results_table(results: list[Result], baselines: dict[str, Baseline]) -> str:
    """The README's table of recorded results (Markdown), one row per baseline and tier, in the
    registry's order."""
    rows = [
        "| baseline | tier | test accuracy (%) | per seed | band (%) | result | wall time | "
        "machine | commit, date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {name: i for i, name in enumerate(baselines)}
    for r in sorted(results, key=lambda r: (order.get(r.baseline, 99), TIERS.index(r.tier))):
        spread = f"{r.mean:.2f} +- {r.std:.2f}" if math.isfinite(r.mean) else "-"
        seeds = ", ".join(f"{a:.2f}" for a in r.accuracies.values())
        rows.append(
            f"| `{r.baseline}` | {r.tier} | {spread} | {seeds} | {r.band['mean']:g} +- "
            f"{r.band['tol']:g} | **{r.status}** | {_duration(r.wall_seconds)} | {r.machine} | "
            f"{r.commit}, {r.date[:10]} |"
        )
    return "\n".join(rows)


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if minutes < 2 else f"{minutes:.0f} min"


def replace_table(text: str, table: str) -> str:
    """`text` (the README) with the part between the verify markers replaced by `table`."""
    begin, end = MARKERS
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ConfigError(f"the README needs exactly one {begin} and one {end} line")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{table}\n{end}{tail}"
