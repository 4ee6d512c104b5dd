"""How long the package takes to start, as one JSON object: each console command's ``--help``, ``import nasiam_hf``
(and ``import nasiam_hf`` followed by ``from transformers import AutoModel``, which registers the NASiam classes),
and the floors they are held to: the interpreter alone, ``import transformers``, and ``from transformers import
PreTrainedModel`` (the cost of any model code). Each is a fresh ``python`` process, timed from outside; the best of
``--repeat`` runs is reported with every run, and the load average before and after (a loaded machine is slower;
the CPU seconds of each process, user + system, are reported too: they depend much less on the load).

    python benchmarks/startup.py                 # best of 3
    python benchmarks/startup.py --repeat 5 --output startup.json

Targets (issue 21): every ``--help`` under 1.5 s; ``import nasiam_hf`` no slower than the PreTrainedModel floor plus
0.3 s. ``targets`` in the output says whether this run met them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

COMMANDS = ("search", "pretrain", "linear_eval", "finetune", "convert")
HELP_TARGET_S = 1.5
IMPORT_MARGIN_S = 0.3


def cases() -> dict[str, list[str]]:
    """name -> the python arguments of one timed process."""
    found = {f"nasiam-{c.replace('_', '-')} --help": ["-m", f"nasiam_hf.commands.{c}", "--help"] for c in COMMANDS}
    found.update({
        "import nasiam_hf": ["-c", "import nasiam_hf"],
        "import nasiam_hf + AutoModel": ["-c", "import nasiam_hf\nfrom transformers import AutoModel"],
        "floor: python": ["-c", "pass"],
        "floor: import transformers": ["-c", "import transformers"],
        "floor: from transformers import PreTrainedModel": ["-c", "from transformers import PreTrainedModel"],
    })
    return found


def time_once(arguments: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one fresh process."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, *arguments], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each case; the best is reported.")
    parser.add_argument("--output", default=None, help="Also write the JSON here.")
    parser.add_argument("--only", default=None,
                        help="Run only the cases whose name contains one of these comma-separated texts (e.g. "
                             "'help,import nasiam_hf'); the targets whose cases did not run are left out.")
    args = parser.parse_args(argv)
    wanted = None if args.only is None else [text for text in args.only.split(",") if text]
    chosen = {name: arguments for name, arguments in cases().items()
              if wanted is None or any(text in name for text in wanted)}
    load_before = os.getloadavg()
    runs = {name: [] for name in chosen}
    cpu = {name: [] for name in chosen}
    for _ in range(args.repeat):  # interleaved, so a burst of load hits every case alike
        for name, arguments in chosen.items():
            wall, seconds = time_once(arguments)
            runs[name].append(round(wall, 3))
            cpu[name].append(round(seconds, 3))
    best = {name: min(times) for name, times in runs.items()}
    helps = {name: value for name, value in best.items() if name.endswith("--help")}
    floor = best.get("floor: from transformers import PreTrainedModel")
    targets = {}
    if helps:
        targets[f"every --help under {HELP_TARGET_S} s"] = max(helps.values()) < HELP_TARGET_S
    if floor is not None and "import nasiam_hf" in best:
        targets[f"import nasiam_hf <= PreTrainedModel floor + {IMPORT_MARGIN_S} s"] = (
            best["import nasiam_hf"] <= floor + IMPORT_MARGIN_S)
    result = {
        "best_s": best,
        "runs_s": runs,
        "best_cpu_s": {name: min(times) for name, times in cpu.items()},  # less sensitive to other processes' load
        "repeat": args.repeat,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "targets": targets,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
