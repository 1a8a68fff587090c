"""The numbers `cnnlab-bench` reports: medians per contender, ratios, and the printed table.

Throughput, first step, start-up and peak memory come from the throughput runs; time to target
and epochs to target from the time-to-target runs (whose peak memory also counts the tests, so it
is kept apart in the JSON runs). A median over runs of which one missed the target is None: the
target was not reached within the epoch budget. The two contenders are cnnlab and PyTorch, or,
with `cnnlab-bench --against REV`, cnnlab and cnnlab at an earlier commit ("before"), or, with
`--against-env NAME=VALUE`, cnnlab and cnnlab with that environment variable set ("env"). The
task's examples are images or series (`settings["unit"]`); the JSON keeps the key
`images_per_second` for both, so that `--against` reads an earlier commit's workers.
"""

import os
import statistics

CONTENDERS = {
    "cnnlab": "cnnlab (JAX)", "torch": "PyTorch eager", "before": "cnnlab before",
    "env": "cnnlab, variable set",
}  # fmt: skip
PAIR = ("cnnlab", "torch")  # the default contenders; the ratios are first / second
# key in a worker's result, the runs it comes from, label ({unit}: images or series), which way
# is better
METRICS = [
    {"key": "images_per_second", "mode": "throughput", "label": "train {unit}/s, steady",
     "better": "higher"},
    {"key": "first_step_seconds", "mode": "throughput", "label": "first step s (JAX compiles)",
     "better": "lower"},
    {"key": "startup_seconds", "mode": "throughput", "label": "start-up s, to 1st step done",
     "better": "lower"},
    {"key": "peak_rss_mb", "mode": "throughput", "label": "peak memory MB (max RSS)",
     "better": "lower"},
    {"key": "time_to_target_seconds", "mode": "target", "label": "time to {target:.0%} test, s",
     "better": "lower"},
    {"key": "epochs_to_target", "mode": "target", "label": "epochs to {target:.0%} test",
     "better": "lower"},
]  # fmt: skip


def summarize(runs: list[dict], pair: tuple[str, str] = PAIR) -> dict:
    """Per contender of `pair`, each metric's median and [min, max] over its runs; the ratios
    first / second."""
    median: dict = {c: {} for c in pair}
    spread: dict = {c: {} for c in pair}
    for contender in pair:
        for m in METRICS:
            values = [
                r[m["key"]] for r in runs if (r["contender"], r["mode"]) == (contender, m["mode"])
            ]
            if not values:
                continue
            reached = [v for v in values if v is not None]
            median[contender][m["key"]] = (
                statistics.median(reached) if len(reached) == len(values) else None
            )
            spread[contender][m["key"]] = [min(reached), max(reached)] if reached else None
    ratio = {}
    for m in METRICS:
        a, b = (median[c].get(m["key"]) for c in pair)
        if a is not None and b:
            ratio[m["key"]] = a / b
    params = {c: sorted({r["params"] for r in runs if r["contender"] == c}) for c in pair}
    return {"pair": list(pair), "median": median, "range": spread, "ratio": ratio, "params": params}


def table(name: str, result: dict, cpus: list[int], labels: dict[str, str] = CONTENDERS) -> str:
    """A plain-text table of one task's medians, ranges and ratios."""
    s, pair = result["settings"], result["pair"]
    unit = s.get("unit", "images")  # results written before series had no unit
    first, second = (labels[c] for c in pair)
    loads = [r["load_average"] for r in result["runs"]]
    cpu_list, machine = ",".join(map(str, cpus)), os.cpu_count()
    lines = [
        f"{name}: {s['title']}, {s['train_images']:,} training / {s['test_images']:,} test "
        f"{unit}, batch {s['batch_size']}, {s['optimizer']['name']}",
        f"both pinned to CPU{'s' * (len(cpus) > 1)} {cpu_list}, {len(cpus)} thread"
        f"{'s' * (len(cpus) > 1)}; per contender {s['rounds']} throughput runs of {s['steps']} "
        f"timed steps and {s['target_rounds']} time-to-target runs; medians [min-max]",
        f"machine load average at the runs' start: {min(loads):.1f}-{max(loads):.1f} on "
        f"{machine} CPUs (above {machine}: other processes were competing)",
    ]
    if max(loads) > machine:
        lines.append(
            f"WARNING: other processes kept the CPUs busy (load average up to {max(loads):.1f} "
            f"on {machine} CPUs): these numbers describe a contended machine"
        )
    row = "{:<30} {:>24} {:>24} {:>13}  {}"
    lines.append(row.format("metric", first, second, "/".join(pair), "better"))
    for m in METRICS:
        if not any(m["key"] in result["median"][c] for c in pair):
            continue
        cells = [_cell(result, c, m["key"]) for c in pair]
        ratio = result["ratio"].get(m["key"])
        lines.append(
            row.format(
                m["label"].format(target=s["target"], unit=unit), *cells,
                "-" if ratio is None else f"{ratio:.2f}", m["better"],
            )
        )  # fmt: skip
    params = result["params"]
    lines.append(row.format("parameters", *(_ints(params[c]) for c in pair), "", ""))
    if params[pair[0]] != params[pair[1]]:
        lines.append("WARNING: the two networks have different parameter counts")
    lines.append(
        f"ratio = {first} / {second}: above 1 favours the first where higher is better, below 1 "
        "where lower is better; time to target is training time, first step in, tests out"
    )
    return "\n".join(line.rstrip() for line in lines)


def _cell(result: dict, contender: str, key: str) -> str:
    if key not in result["median"][contender]:
        return "-"
    value, spread = result["median"][contender][key], result["range"][contender][key]
    if value is None:
        return "not reached"
    text = _number(value)
    if spread and spread[0] != spread[1]:
        text += f" [{_number(spread[0])}-{_number(spread[1])}]"
    return text


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _ints(values: list[int]) -> str:
    return "/".join(f"{v:,}" for v in values)
