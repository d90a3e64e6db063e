"""``make bench``: run every benchmark and write experiments/BENCHMARKS.md and .json.

``python -m pdl1exp.bench [--quick] [--only SECTION ...] [--out FOLDER]``. ``--only`` reruns
those sections and keeps the others of an existing report (listed under ``machine`` as from
an earlier run). ``--quick`` (what
``make bench BENCH_QUICK=1`` passes) keeps the scaling to 100, 240 and the e2e 352-patient
cold run (no 1000/3000): its sections but scaling and paper took 9 min of the full run's
29 on the 2-core machine of experiments/BENCHMARKS.md. The full run adds ``paper``
(``+experiment=paper`` where the e2e runs left the cohort, masks and deep features cached:
a first run that sweeps, nests and logs from scratch, then a warm one; 3.3 min) and scales to
1000 and 3000 patients: 100, 352, 1000 and 3000 at the smaller volumes, 2 trials per
classifier and 3 CV folds (its ``overrides`` and ``volumes`` say so; 16 min, 10 of them at
3000).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from joblib import cpu_count

from pdl1exp.bench import backbone as bench_backbone
from pdl1exp.bench import e2e as bench_e2e
from pdl1exp.bench import radiomics as bench_radiomics
from pdl1exp.bench import scaling as bench_scaling
from pdl1exp.bench import statistics as bench_statistics
from pdl1exp.bench import sweep as bench_sweep

__all__ = ["TARGETS", "main", "ratios"]

log = logging.getLogger(__name__)
_TEXT = {
    "backbone": "≥ 75 % of the measured bf16 matmul peak (≥ 70 % fp32)",
    "extraction": "352-patient cohort: cache hit < 2 s",
    "sweep": "7 classifiers × configured trials in minutes on 2 cores",
    "statistics": "bootstrap of 8 metrics ≥ 20× a Python loop; delong_ci(n=100 000) < 1 s",
    "radiomics": "PyRadiomics per patient; parallel speed-up with 2 processes",
    "e2e": "`+experiment=fusion`, 352 patients, 2 cores: cold ≤ 3 min, warm ≤ 75 s, "
           "peak RSS ≤ 3 GB",
    "paper": "`+experiment=paper` (the paper's selection, 7 classifiers, whole-chain nested "
             "CV), 352 patients, 2 cores: warm ≤ 4 min",
    "scaling": "no stage worse than O(n log n) (exponent ≤ ~1.1) except the classifiers' "
               "training; RSS flat in n for loading/extraction",
    "peer_240": "240 patients: peers 17–21 s extraction + 3–4 min modelling (quoted)",
    "e2e_gpu": "cold e2e with GPU extraction (on a machine with a CUDA GPU)",
    "backbone_gpu": "ROIs/s of both backbones on a CUDA GPU at a batch that fills it, as a "
                    "fraction of its measured matmul peak (no target: recorded)",
}
# (section, measure) → (target, "max" | "min"): the ratios of the report (value / target).
TARGETS: dict[tuple[str, str], tuple[float, str]] = {
    ("e2e", "cold_s"): (180.0, "max"),
    ("e2e", "warm_s"): (75.0, "max"),
    ("e2e", "peak_rss_mb"): (3072.0, "max"),
    ("paper", "warm_s"): (240.0, "max"),
    ("backbone", "bf16_fraction_of_peak"): (0.75, "min"),
    ("backbone", "fp32_fraction_of_peak"): (0.70, "min"),
    ("backbone", "fmcib_3d_bf16_fraction_of_peak"): (0.75, "min"),
    ("backbone", "fmcib_3d_fp32_fraction_of_peak"): (0.70, "min"),
    ("extraction", "cached_s"): (2.0, "max"),
    ("statistics", "delong_ci_s"): (1.0, "max"),
    ("statistics", "bootstrap_all_speedup"): (20.0, "min"),
}


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of :data:`TARGETS` with its value, ratio (value / target) and verdict.

    A section run without a target's measure gets no row; one that records it as None
    (a bf16 target on a CPU without bf16) gets a row with ``met`` None: not measured.
    """
    rows = []
    for (section, measure), (target, sense) in TARGETS.items():
        if measure not in results.get(section, {}):
            continue
        value = results[section][measure]
        measured = value is not None
        met = (value <= target if sense == "max" else value >= target) if measured else None
        rows.append({"section": section, "measure": measure, "target": target, "sense": sense,
                     "value": value, "ratio": value / target if measured else None, "met": met})
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, default=str)}`"
    return str(value)


def _section(name: str, results: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{k}` | {_cell(v)} |" for k, v in results.items())
    return f"## {name}\n\nTarget: {_TEXT[name]}\n\n| measure | value |\n|---|---|\n{rows}\n"


def _targets_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"| {r['section']} | `{r['measure']}` | {'≤' if r['sense'] == 'max' else '≥'} "
             f"{r['target']:g} | "
             + ("— | — | not measured |" if r["met"] is None else
                f"{r['value']:.4g} | {r['ratio']:.2f} | {'met' if r['met'] else 'missed'} |")
             for r in rows]
    return ("## Targets\n\n| section | measure | target | value | ratio | verdict |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def _suites(quick: bool, scratch: ExitStack) -> dict[str, Callable[[], dict[str, Any]]]:
    """The benchmarks in order. With ``quick``, scaling reuses the e2e and 240-patient runs;
    the full scaling reruns every size at the smaller volumes, and the full bench adds paper,
    run where the e2e runs left their caches. ``scratch`` removes the folders when it closes."""
    fusion = ("+experiment=fusion",)
    measured: dict[int, dict[str, Any]] = {}

    @functools.cache
    def fusion_folder() -> str:
        """The folder of the fusion runs (e2e), made on first use and kept until the end."""
        return scratch.enter_context(tempfile.TemporaryDirectory(prefix="pdl1exp-bench-"))

    def e2e() -> dict[str, Any]:
        result = bench_e2e.run(overrides=fusion, folder=fusion_folder())
        measured[352] = {"wall_s": result["cold_s"], "peak_rss_mb": result["peak_rss_mb"],
                         "peak_pss_mb": result["peak_pss_mb"],
                         "stages_s": result["stages_s"],
                         "warm_stages_s": result["warm_stages_s"],
                         "excluded_patients": result["excluded_patients"]}
        return result

    def paper() -> dict[str, Any]:
        """The paper's experiment where the fusion runs left the cohort, masks and deep
        features (the same ROIs and backbone) cached: its first run extracts nothing and
        sweeps, nests and logs from scratch; its target is the warm run."""
        if 352 not in measured:  # without the e2e section: its cold run first, untimed
            bench_e2e.run_pipeline(fusion, folder=fusion_folder())
        return bench_e2e.run(overrides=("+experiment=paper",), folder=fusion_folder(),
                             first="after_fusion")

    def peer() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="pdl1exp-peer-") as folder:
            measured[240] = bench_e2e.run_pipeline(
                [*fusion, "dataset.generator.n_patients=240"], folder=folder)
        return bench_scaling.peer_240(measured[240])

    def scaling() -> dict[str, Any]:
        if quick:  # the e2e and 240-patient runs, plus one of 100
            return bench_scaling.run(n=(100, 240, 352), overrides=fusion, known=measured)
        # Up to 3000 patients: every size at the smaller volumes, 2 trials per classifier
        # and 3 CV folds, so that each exponent compares like with like and the whole bench
        # keeps within 30 min on 2 cores. Both are constant factors at every n: the
        # classifiers' training (exempt from the O(n log n) bound) is a trial budget times a
        # fit, and the folds multiply the sweep's selections and the combined model's
        # cross-fit (its 5 x 6 LASSO refits per signature were most of the 3000-patient
        # sweep); the e2e and peer_240 runs time the default 20 trials and 5 folds. A seed
        # whose region leaks excludes its patient (counted under ``excluded``), as a user of
        # thousands would choose.
        return bench_scaling.run(
            n=(100, 352, 1000, 3000), large_from=0,
            overrides=(*fusion, "tuning.n_trials=2", "tuning.cv_folds=3",
                       "dataset.on_error=skip"))

    def extraction() -> dict[str, Any]:
        """The e2e runs' deep-feature stage: cold, then from the cache (warm run)."""
        if 352 not in measured:
            msg = "the extraction section comes from the e2e runs: --only e2e extraction"
            raise SystemExit(msg)
        return {"patients": 352, "cold_s": measured[352]["stages_s"]["deep_features"],
                "cached_s": measured[352]["warm_stages_s"]["deep_features"],
                "source": "e2e deep_features stage, cold and warm"}

    suites: dict[str, Callable[[], dict[str, Any]]] = {
        "e2e": e2e, "backbone": lambda: bench_backbone.run(n_images=32 if quick else 64),
        "statistics": bench_statistics.run, "sweep": bench_sweep.run,
        "radiomics": bench_radiomics.run, "extraction": extraction,
        "peer_240": peer, "scaling": scaling,
    }
    if not quick:
        suites["paper"] = paper
    if torch.cuda.is_available():  # each GPU section names its machine (merged elsewhere)
        suites["e2e_gpu"] = lambda: {"machine": _gpu_machine(), **bench_e2e.run(
            overrides=(*fusion, "backbone.devices=1"))}
        suites["backbone_gpu"] = lambda: {"machine": _gpu_machine(), **bench_backbone.run(
            device="cuda", n_images=2048, n_volumes=512, overrides=("backbone.batch_size=256",),
            overrides_3d=("backbone.batch_size=64",))}
    return suites


def _gpu_machine() -> str:
    """The GPU the sections run on, the cores the run's pools count (affinity and cgroup
    quota, as :mod:`pdl1exp.workers`) and the CPU, in words."""
    return f"{torch.cuda.get_device_name()}, {cpu_count()} cores of {_cpu_model()}"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks and write the report beside experiments/README.md."""
    parser = argparse.ArgumentParser(prog="python -m pdl1exp.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="no paper section, no 1000/3000-patient scaling runs")
    parser.add_argument("--only", nargs="+", help="run these sections only")
    parser.add_argument("--out", default="experiments", help="folder of BENCHMARKS.*")
    parser.add_argument("--merge", type=Path, metavar="JSON",
                        help="add the sections of another machine's BENCHMARKS.json (a GPU "
                             "machine's backbone_gpu and e2e_gpu) to the report in --out; "
                             "runs nothing")
    args = parser.parse_args(argv)
    if args.merge:
        _merge(Path(args.out), args.merge)
        return
    logging.basicConfig(level=logging.INFO)
    scratch = ExitStack()
    suites = _suites(args.quick, scratch)
    unknown = set(args.only or ()) - set(suites)
    if unknown:
        msg = f"--only: unknown section(s) {sorted(unknown)}; choose from {list(suites)}"
        raise SystemExit(msg)
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads(), "quick": args.quick,
                    "cpus": os.cpu_count(),
                    # Other users of the cores make every wall time here longer.
                    "load_average_1m_at_start": os.getloadavg()[0],
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    if args.only:  # the other sections of an existing report stay, marked as earlier
        earlier = _earlier(Path(args.out), rerun=set(args.only))
        results["machine"]["sections_from_an_earlier_run"] = sorted(earlier)
        results.update(earlier)
    with scratch:
        for name, suite in suites.items():
            if args.only and name not in args.only:
                continue
            log.info("Benchmark: %s", name)
            start = time.perf_counter()
            results[name] = suite()
            log.info("Benchmark %s took %.0f s", name, time.perf_counter() - start)
            _write(Path(args.out), results, quick=args.quick)  # after each: a partial report


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what :mod:`platform` knows):
    machines differ between runs, and every wall time depends on it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _earlier(folder: Path, *, rerun: set[str]) -> dict[str, Any]:
    """The sections of ``folder``'s existing BENCHMARKS.json other than ``rerun`` (none
    without one), those of the full bench too under ``--quick`` (``paper``)."""
    path = folder / "BENCHMARKS.json"
    if not path.is_file():
        return {}
    return {name: value for name, value in json.loads(path.read_text()).items()
            if name not in {*rerun, "machine", "targets"}}


def _merge(folder: Path, other: Path) -> None:
    """Add ``other``'s GPU sections (a GPU machine's report: each names that machine under
    ``machine``) to ``folder``'s report, each replacing the section of that name.

    Any other section of ``other`` (its CPU sections, which would replace this machine's
    under a header naming this one) stops the merge with one error naming them.
    """
    report = folder / "BENCHMARKS.json"
    for path in (report, other):
        if not path.is_file():
            msg = f"--merge: no benchmark report at {path}"
            raise SystemExit(msg)
    results = json.loads(report.read_text())
    results.pop("targets", None)
    sections = {name: value for name, value in json.loads(other.read_text()).items()
                if name not in {"machine", "targets"}}
    unnamed = sorted(name for name, value in sections.items() if "machine" not in value)
    if unnamed:
        msg = (f"--merge: {other} has sections that do not name their machine: {unnamed}; "
               "run only the GPU sections there (--only e2e_gpu backbone_gpu)")
        raise SystemExit(msg)
    results.update(sections)
    machine = results["machine"]
    if "sections_from_an_earlier_run" in machine:  # the merged ones are new
        machine["sections_from_an_earlier_run"] = [
            name for name in machine["sections_from_an_earlier_run"] if name not in sections]
    _write(folder, results, quick=machine["quick"])


def _write(folder: Path, results: dict[str, Any], *, quick: bool) -> None:
    """BENCHMARKS.json and BENCHMARKS.md (targets table first) of the sections run so far."""
    targets = ratios(results)
    folder.mkdir(exist_ok=True)
    (folder / "BENCHMARKS.json").write_text(
        json.dumps({**results, "targets": targets}, indent=2, default=str))
    body = "\n".join(_section(name, value) for name, value in results.items()
                     if name != "machine")
    machine = results["machine"]
    earlier = machine.get("sections_from_an_earlier_run")
    kept = (f" Kept from an earlier run, which may have been on another machine: "
            f"{', '.join(earlier)}." if earlier else "")
    kept += "".join(f" `{name}` ran on {value['machine']}." for name, value in results.items()
                    if name != "machine" and "machine" in value)
    (folder / "BENCHMARKS.md").write_text(
        f"# Benchmarks\n\nWritten by `make bench` on {machine['platform']}, "
        f"{machine['processor']} ({machine['cpu_capability']}; "
        f"{machine['torch_threads']} torch threads{', quick subset' if quick else ''}).{kept}"
        f"\n\n{_targets_table(targets)}\n{body}")


if __name__ == "__main__":
    main()
