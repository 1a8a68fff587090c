"""The registry of baselines: experiment presets with a stated result to reproduce.

A baseline is a Hydra experiment preset (`conf/experiment/<name>.yaml`) plus a small YAML file of
the same name in the baselines folder (`experiments/baselines/<name>.yaml`) that says what the
preset must reproduce, read with a YAML parser into `Baseline`:

    title: LeNet-5 (ReLU, max pooling) on Fashion-MNIST
    command: cnnlab-verify lenet5_fashion_mnist --tier full
    source: what it reproduces, with a reference
    compute: what the full tier costs
    full: {mean: 91.3, tol: 0.3, seeds: [0, 1, 2]}
    quick: {mean: 72, tol: 4, seeds: [0], overrides: [data.train_limit=5000, train.epochs=2]}
    published: 91.25 (He et al. 2016)  # optional: the figure the band is anchored on

`full` is the full tier: the mean test accuracy (%) over its seeds must lie within mean +-
tol. `quick` is the tier CI runs: shorter, with its `overrides`, and its own band.
`cnnlab-verify` (experiments/verify.py) runs the tiers; `judge` decides pass or fail, and
`results_table` renders the README's table from the result records it writes.
"""

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cnnlab.errors import ConfigError

TIERS = ("quick", "full")
TEXTS = ("title", "command", "source", "compute")  # the file's keys besides the tiers
OPTIONAL = ("published",)  # the published figure the band is anchored on, where there is one
BAND_FORM = "{mean: <%>, tol: <%>, seeds: [<seed>, ...], overrides: [<key=value>, ...]}"


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
    title: str
    command: str
    source: str
    compute: str
    tiers: dict[str, Band]  # "full" and "quick"
    published: str = ""  # e.g. "96.1 +- 0.3 (dl-4-tsc, 10 runs)"; "": no published figure


def parse_band(value: object, where: str) -> Band:
    """The band of one tier from its YAML mapping; a clear error naming `where` otherwise."""
    fields = value if isinstance(value, dict) else {}
    seeds, overrides = fields.get("seeds"), fields.get("overrides", [])
    numbers = [fields.get("mean"), fields.get("tol")]
    well_formed = (
        set(fields) <= {"mean", "tol", "seeds", "overrides"}
        and all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
        and isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        and isinstance(overrides, list)
        and all(isinstance(o, str) and "=" in o for o in overrides)
    )
    if not well_formed:
        raise ConfigError(f"{where}: cannot read the band {value!r}; write it as {BAND_FORM}")
    return Band(float(numbers[0]), float(numbers[1]), tuple(seeds), tuple(overrides))


def load_baseline(path: Path) -> Baseline:
    """The baseline that `path` (experiments/baselines/<name>.yaml) declares."""
    try:
        fields = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    fields = fields if isinstance(fields, dict) else {}
    keys = (*TEXTS, *TIERS)
    problems = []
    if missing := [k for k in keys if k not in fields]:
        problems.append(f"lacks {', '.join(missing)}")
    if unknown := sorted(set(fields) - set(keys) - set(OPTIONAL)):
        problems.append(f"has unknown keys {', '.join(unknown)}")
    if problems:
        raise ConfigError(f"{path}: {'; '.join(problems)} (the keys are {', '.join(keys)})")
    texts = {k: str(fields[k]).strip() for k in (*TEXTS, *OPTIONAL) if k in fields}
    tiers = {tier: parse_band(fields[tier], f"{path} {tier}") for tier in TIERS}
    return Baseline(Path(path).stem, tiers=tiers, **texts)


def registry(baselines_dir: Path) -> dict[str, Baseline]:
    """Every baseline declared in `baselines_dir`, by name, in file-name order."""
    found = (load_baseline(path) for path in sorted(Path(baselines_dir).glob("*.yaml")))
    return {b.name: b for b in found}


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
RECORDS = "experiments/results"  # where cnnlab-verify --record writes, relative to the README


def results_table(results: list[Result], baselines: dict[str, Baseline]) -> str:
    """The README's table of recorded results (Markdown), one row per baseline and tier, in the
    registry's order."""
    rows = [
        "| baseline | tier | test accuracy (%) | per seed | band (%) | published (%) | result | "
        "wall time | machine | record: commit, date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {name: i for i, name in enumerate(baselines)}
    for r in sorted(results, key=lambda r: (order.get(r.baseline, 99), TIERS.index(r.tier))):
        spread = f"{r.mean:.2f} +- {r.std:.2f}" if math.isfinite(r.mean) else "-"
        seeds = ", ".join(f"{a:.2f}" for a in r.accuracies.values())
        known = baselines.get(r.baseline)
        published = known.published if known and known.published and r.tier == "full" else "-"
        rows.append(
            f"| `{r.baseline}` | {r.tier} | {spread} | {seeds} | {r.band['mean']:g} +- "
            f"{r.band['tol']:g} | {published} | **{r.status}** | {_duration(r.wall_seconds)} | "
            f"{r.machine} | [{r.commit}, {r.date[:10]}]({RECORDS}/{r.baseline}-{r.tier}.json) |"
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
