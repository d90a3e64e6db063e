"""The benchmarks on tiny sizes: their contract keys, stage timing and the bf16 fast path.

No assertion depends on how fast anything ran: clocks are replaced where times are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pdl1exp.bench import __main__ as bench_main
from pdl1exp.bench import backbone as bench_backbone
from pdl1exp.bench import e2e as bench_e2e
from pdl1exp.bench import radiomics as bench_radiomics
from pdl1exp.bench import scaling as bench_scaling
from pdl1exp.bench import sweep as bench_sweep
from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.extract import resolve_precision
from pdl1exp.features.extractor import DeepFeatureExtractor

# Least cosine similarity and largest relative L2 error of bf16 features against fp32 ones.
BF16_COSINE_MIN = 0.999
BF16_RELATIVE_ERROR_MAX = 0.03
MAX_POLLS = 400  # of the peak-RSS sampler, 0.05 s apart


class _Clock:
    """A fake ``time.perf_counter`` advanced by the timed functions themselves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stage_timer_counts_exclusive_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(bench_e2e.time, "perf_counter", clock)
    timer = bench_e2e.StageTimer()

    def inner() -> None:
        clock.now += 3.0

    timed_inner = timer.wrap("inner", inner)

    def outer() -> str:
        clock.now += 2.0
        timed_inner()
        clock.now += 1.0
        return "done"

    assert timer.wrap("outer", outer)() == "done"
    timed_inner()
    assert dict(timer.seconds) == {"inner": 6.0, "outer": 3.0}
    # Calls are recorded as they end; the inner call lies within the outer one.
    assert [stage for stage, _, _ in timer.intervals] == ["inner", "outer", "inner"]
    (_, inner_start, inner_end), (_, outer_start, outer_end) = timer.intervals[:2]
    assert outer_start <= inner_start <= inner_end <= outer_end


def test_stage_peaks_charge_each_sample_to_the_innermost_running_stage() -> None:
    intervals = [("radiomics", 12.0, 14.0), ("validation", 10.0, 20.0), ("sweep", 30.0, 40.0)]
    samples = [(5.0, 100.0), (11.0, 900.0), (13.0, 2500.0), (15.0, 1200.0), (35.0, 3100.0),
               (36.0, 2000.0), (50.0, 300.0)]
    assert bench_e2e.stage_peaks(samples, intervals) == {
        "other": 300.0, "validation": 1200.0, "radiomics": 2500.0, "sweep": 3100.0}
    assert bench_e2e.stage_peaks([], intervals) == {}


def test_stage_timer_patches_and_restores_the_pipeline_stages() -> None:
    import pdl1exp.pipeline as pipeline
    from pdl1exp.data.synthetic import SyntheticCohort

    originals = {name: getattr(pipeline, name) for _, name, _ in bench_e2e.STAGES
                 if "." not in name and hasattr(pipeline, name)}
    write = SyntheticCohort.write
    with bench_e2e.StageTimer().patched():
        assert all(getattr(pipeline, name) is not f for name, f in originals.items())
        assert SyntheticCohort.write is not write
    assert all(getattr(pipeline, name) is f for name, f in originals.items())
    assert SyntheticCohort.write is write


def test_peak_rss_sees_a_child_process(tmp_path: Path) -> None:
    """A child holding 200 MB shows in the tree's peak (it signals through a file)."""
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import pathlib, time
        block = bytearray(200 * 2**20)
        pathlib.Path({str(ready)!r}).write_text("1")
        while pathlib.Path({str(ready)!r}).exists():
            time.sleep(0.05)
    """)
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        with bench_e2e.peak_rss(os.getpid(), period_s=0.05) as memory:
            while not ready.exists():
                assert child.poll() is None, "the child ended before allocating"
                time.sleep(0.01)
            # Give the sampler a bounded number of chances to see the allocation.
            for _ in range(MAX_POLLS):
                if memory["peak_mb"] >= 200:
                    break
                time.sleep(0.05)
            ready.unlink()
            child.wait()
    finally:
        child.kill()
    assert memory["peak_mb"] >= 200
    assert 0 < memory["peak_pss_mb"] <= memory["peak_mb"]
    assert max(mb for _, mb in memory["samples"]) == memory["peak_mb"]


def test_peak_rss_reads_pss_at_its_own_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """RSS is sampled every period, the costly PSS only every ``pss_period_s``."""
    calls = {"rss": 0, "pss": 0}
    memory_info, memory_full_info = psutil.Process.memory_info, psutil.Process.memory_full_info

    def counted(kind, method):
        def wrapper(self):
            calls[kind] += 1
            return method(self)
        return wrapper

    monkeypatch.setattr(psutil.Process, "memory_info", counted("rss", memory_info))
    monkeypatch.setattr(psutil.Process, "memory_full_info", counted("pss", memory_full_info))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a process without children: one process read per sample
        with bench_e2e.peak_rss(child.pid, period_s=0.02, pss_period_s=60.0) as memory:
            for _ in range(MAX_POLLS):
                if len(memory["samples"]) >= 5:
                    break
                time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
    assert len(memory["samples"]) >= 5
    assert calls["pss"] == 1  # the first sample only
    assert calls["rss"] >= 4
    assert 0 < memory["peak_pss_mb"] <= memory["peak_mb"]


def test_exponents_are_log_log_slopes() -> None:
    result = bench_scaling.exponents([10, 100, 1000], {
        "linear": [0.1, 1.0, 10.0], "flat": [2.0, 2.0, 2.0], "square": [0.1, 10.0, 1000.0],
        "negligible": [0.01, 0.02, 0.04]})
    assert result == {"linear": 1.0, "flat": 0.0, "square": 2.0}


def test_scaling_runs_each_unknown_size_cold_with_the_large_overrides_from_large_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(overrides: list[str], *, folder: str) -> dict:
        calls.append(overrides)
        size = int(next(o for o in overrides if "n_patients" in o).split("=")[1])
        return {"wall_s": size / 10, "peak_rss_mb": 500.0, "peak_pss_mb": 400.0,
                "stages_s": {"cohort": size / 100, "sweep": 30.0},
                "excluded_patients": size // 1000}

    monkeypatch.setattr(bench_scaling, "run_pipeline", fake_run)
    known = {100: fake_run(["dataset.generator.n_patients=100"], folder="")}
    calls.clear()
    result = bench_scaling.run(n=(100, 1000, 10000), overrides=("+experiment=x", "t=4"),
                               large=("small=1",), large_from=1000, known=known)
    assert calls == [["+experiment=x", "t=4", "dataset.generator.n_patients=1000", "small=1"],
                     ["+experiment=x", "t=4", "dataset.generator.n_patients=10000", "small=1"]]
    assert result["overrides"] == ["+experiment=x", "t=4"]
    assert result["excluded"] == [0, 1, 10]
    assert result["exponent"] == {"cohort": 1.0, "sweep": 0.0, "total": 1.0}
    assert result["volumes"] == {"default": [100], "smaller (small=1)": [1000, 10000]}


def test_the_full_scaling_reruns_every_size_small_with_2_trials_3_folds_and_skipping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(bench_main.bench_scaling, "run",
                        lambda **kwargs: calls.append(kwargs) or {})
    bench_main._suites(False, ExitStack())["scaling"]()
    assert calls == [{"n": (100, 352, 1000, 3000), "large_from": 0, "overrides": (
        "+experiment=fusion", "tuning.n_trials=2", "tuning.cv_folds=3",
        "dataset.on_error=skip")}]  # no known runs


def test_excluded_patients_counts_distinct_ids_of_this_runs_tables(tmp_path: Path) -> None:
    old = tmp_path / "mlruns" / "1" / "a" / "excluded_patients.csv"
    new = tmp_path / "mlruns" / "1" / "b" / "excluded_patients.csv"
    for path, rows in ((old, "P1,seed,x\n"), (new, "P2,seed,leaks\nP2,mask,x\nP3,ct,x\n")):
        path.parent.mkdir(parents=True)
        path.write_text("patient_id,column,reason\n" + rows)
    os.utime(old, (1000.0, 1000.0))
    assert bench_e2e.excluded_patients(tmp_path, since=2000.0) == 2
    assert bench_e2e.excluded_patients(tmp_path, since=0.0) == 3
    assert bench_e2e.excluded_patients(tmp_path / "mlruns" / "2", since=0.0) == 0


def test_peer_240_splits_extraction_and_modelling() -> None:
    result = bench_scaling.peer_240({"wall_s": 100.0, "peak_rss_mb": 900.0, "stages_s": {
        "cohort": 30.0, "segmentation": 5.0, "deep_features": 10.0, "radiomics": 5.0,
        "sweep": 40.0, "other": 10.0}})
    assert result["pdl1exp_cohort_generation_s"] == 30.0
    assert result["pdl1exp_extraction_s"] == 20.0
    assert result["pdl1exp_modelling_s"] == 50.0
    assert result["peers_quoted"] == bench_scaling.PEER_240


def test_ratios_judge_each_target() -> None:
    rows = bench_main.ratios({"e2e": {"cold_s": 360.0, "warm_s": 60.0, "peak_rss_mb": 1000.0},
                              "backbone": {"bf16_fraction_of_peak": 0.8}})
    verdicts = {r["measure"]: (r["ratio"], r["met"]) for r in rows}
    assert verdicts == {"cold_s": (2.0, False), "warm_s": (0.8, True),
                        "peak_rss_mb": (1000.0 / 3072.0, True),
                        "bf16_fraction_of_peak": (0.8 / 0.75, True)}


def test_e2e_run_runs_twice_in_one_folder_and_names_the_first_run(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folders = []

    def fake_pipeline(overrides: tuple[str, ...], *, folder: str) -> dict:
        folders.append(folder)
        first = len(folders) == 1
        return {"wall_s": 10.0 if first else 2.0, "peak_rss_mb": 5.0 if first else 7.0,
                "peak_pss_mb": 3.0, "stages_s": {"sweep": 8.0 if first else 1.0},
                "peak_rss_mb_by_stage": {}, "excluded_patients": 0}

    monkeypatch.setattr(bench_e2e, "run_pipeline", fake_pipeline)
    result = bench_e2e.run(overrides=("+experiment=paper",), folder=tmp_path,
                           first="after_fusion")
    assert folders == [tmp_path, tmp_path]
    assert (result["after_fusion_s"], result["warm_s"], result["peak_rss_mb"]) == (10.0, 2.0, 7.0)
    assert "cold_s" not in result
    assert (result["stages_s"], result["warm_stages_s"]) == ({"sweep": 8.0}, {"sweep": 1.0})
    folders.clear()
    assert bench_e2e.run()["cold_s"] == 10.0
    assert folders[0] == folders[1] != tmp_path
    assert not Path(folders[0]).exists()  # a temporary folder of its own, removed


def test_the_paper_section_runs_where_the_fusion_runs_left_their_caches_in_the_full_bench_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    runs, pipelines = [], []

    def fake_run(*, overrides: tuple[str, ...], folder: str, first: str = "cold") -> dict:
        runs.append((overrides, folder, first))
        assert Path(folder).is_dir()
        return {f"{first}_s": 100.0, "warm_s": 300.0, "stages_s": {"deep_features": 50.0},
                "warm_stages_s": {"deep_features": 1.0}, "peak_rss_mb": 1.0,
                "peak_pss_mb": 1.0, "excluded_patients": 0}

    monkeypatch.setattr(bench_main.bench_e2e, "run", fake_run)
    monkeypatch.setattr(bench_main.bench_e2e, "run_pipeline",
                        lambda overrides, *, folder: pipelines.append((overrides, folder)))
    with ExitStack() as scratch:
        assert "paper" not in bench_main._suites(True, scratch)
        suites = bench_main._suites(False, scratch)
        suites["e2e"]()
        result = suites["paper"]()
        assert suites["extraction"]()["cached_s"] == 1.0
        alone = bench_main._suites(False, scratch)  # --only paper: the fusion caches first
        with pytest.raises(SystemExit, match="--only e2e extraction"):
            alone["extraction"]()
        alone["paper"]()
        folders = [folder for _, folder, _ in runs]
    assert [(o, f) for o, _, f in runs] == [(("+experiment=fusion",), "cold"),
                                            (("+experiment=paper",), "after_fusion"),
                                            (("+experiment=paper",), "after_fusion")]
    assert folders[0] == folders[1] != folders[2]
    assert pipelines == [(("+experiment=fusion",), folders[2])]
    assert not any(Path(f).exists() for f in folders)  # removed when the bench ends
    rows = bench_main.ratios({"paper": result})
    assert [(r["measure"], r["ratio"], r["met"]) for r in rows] == [("warm_s", 1.25, False)]


def test_only_reruns_its_sections_and_keeps_the_others(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    suites = {"statistics": lambda: {"delong_ci_s": 0.5},
              "radiomics": lambda: pytest.fail("--only statistics ran radiomics")}
    monkeypatch.setattr(bench_main, "_suites", lambda quick, scratch: suites)
    (tmp_path / "BENCHMARKS.json").write_text(json.dumps({
        "machine": {"platform": "earlier"}, "radiomics": {"patients": 4},
        "paper": {"warm_s": 40.0},  # a full-bench section, kept though not a suite here
        "statistics": {"delong_ci_s": 2.0}, "targets": []}))
    bench_main.main(["--only", "statistics", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    assert report["statistics"] == {"delong_ci_s": 0.5}
    assert report["radiomics"] == {"patients": 4}
    assert report["paper"] == {"warm_s": 40.0}
    assert report["machine"]["sections_from_an_earlier_run"] == ["paper", "radiomics"]
    assert [t["value"] for t in report["targets"]] == [40.0, 0.5]
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "`patients` | 4" in markdown
    assert ("Kept from an earlier run, which may have been on another machine: paper, radiomics"
            in markdown)
    assert report["machine"]["processor"]
    assert report["machine"]["cpu_capability"]


def test_gpu_sections_run_on_a_cuda_machine_and_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}
    monkeypatch.setattr(bench_main.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_main.torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(bench_main.bench_backbone, "run",
                        lambda **kwargs: calls.setdefault("backbone", kwargs) and {"x": 1})
    monkeypatch.setattr(bench_main.bench_e2e, "run",
                        lambda **kwargs: calls.setdefault("e2e", kwargs) and {"cold_s": 9.0})
    with ExitStack() as scratch:
        suites = bench_main._suites(True, scratch)
        backbone, e2e = suites["backbone_gpu"](), suites["e2e_gpu"]()
    assert backbone["machine"].startswith("Fake GPU, ")
    assert e2e["machine"] == backbone["machine"]
    assert (backbone["x"], e2e["cold_s"]) == (1, 9.0)
    assert calls["backbone"]["device"] == "cuda"
    assert calls["e2e"]["overrides"] == ("+experiment=fusion", "backbone.devices=1")
    monkeypatch.setattr(bench_main.torch.cuda, "is_available", lambda: False)
    with ExitStack() as scratch:
        assert not {"backbone_gpu", "e2e_gpu"} & set(bench_main._suites(True, scratch))


def test_merge_adds_another_machines_sections_and_runs_nothing(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(bench_main, "_suites", lambda quick, scratch: pytest.fail("ran"))
    gpu = tmp_path / "gpu.json"
    with pytest.raises(SystemExit, match=r"no benchmark report at .*BENCHMARKS\.json"):
        bench_main.main(["--merge", str(gpu), "--out", str(tmp_path)])
    (tmp_path / "BENCHMARKS.json").write_text(json.dumps({
        "machine": {"platform": "here", "processor": "CPU", "cpu_capability": "AVX2",
                    "torch_threads": 2, "quick": False,
                    "sections_from_an_earlier_run": ["e2e", "e2e_gpu"]},
        "e2e": {"cold_s": 360.0}, "e2e_gpu": {"machine": "old", "cold_s": 1.0},
        "targets": []}))
    with pytest.raises(SystemExit, match=r"no benchmark report at .*gpu\.json"):
        bench_main.main(["--merge", str(gpu), "--out", str(tmp_path)])
    gpu.write_text(json.dumps({  # a whole report of the GPU machine: its CPU sections too
        "machine": {"platform": "there"}, "targets": [], "e2e": {"cold_s": 100.0},
        "e2e_gpu": {"machine": "Fake GPU, 16 cores of X", "cold_s": 90.0}}))
    with pytest.raises(SystemExit, match=r"do not name their machine: \['e2e'\]"):
        bench_main.main(["--merge", str(gpu), "--out", str(tmp_path)])
    gpu.write_text(json.dumps({
        "machine": {"platform": "there"}, "targets": [],
        "e2e_gpu": {"machine": "Fake GPU, 16 cores of X", "cold_s": 90.0}}))
    bench_main.main(["--merge", str(gpu), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    assert report["machine"]["platform"] == "here"
    assert report["machine"]["sections_from_an_earlier_run"] == ["e2e"]
    assert report["e2e"] == {"cold_s": 360.0}
    assert report["e2e_gpu"] == {"machine": "Fake GPU, 16 cores of X", "cold_s": 90.0}
    assert [(t["measure"], t["met"]) for t in report["targets"]] == [("cold_s", False)]
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "`e2e_gpu` ran on Fake GPU, 16 cores of X." in markdown
    assert "## e2e_gpu" in markdown


@pytest.mark.parametrize("bf16", [True, False])
def test_backbone_bench_has_the_contract_keys_on_tiny_inputs(
        bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Forced either way: tiny bf16 inputs run (emulated) on any CPU.
    monkeypatch.setattr(bench_backbone, "cpu_bf16", lambda: bf16)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    result = bench_backbone.run(  # compiling is asked for where it must be skipped
        n_images=2, n_volumes=1, compile_2d=not bf16, matmul_sizes=(64,),
        overrides=("backbone.batch_size=2", "backbone.input_size=[32,32]"),
        overrides_3d=("backbone.batch_size=1", "backbone.input_size=[16,16,16]"))
    assert result["bf16_supported"] is bf16
    assert torch.backends.cuda.matmul.allow_tf32 is tf32  # the peak's TF32 setting undone
    # as many timed batches as the peak's timings per size, however few images were asked for
    assert result["images_timed"] == 2 * bench_backbone.MIN_TIMED_BATCHES
    assert result["fmcib_3d_images_timed"] == bench_backbone.MIN_TIMED_BATCHES
    for prefix in ("", "fmcib_3d_"):
        assert result[f"{prefix}fp32_rois_per_s"] > 0
        assert result[f"{prefix}fp32_fraction_of_peak"] > 0
        for path in ("autocast", "bf16"):
            if bf16:
                assert result[f"{prefix}{path}_rois_per_s"] > 0
                assert result[f"{prefix}{path}_fraction_of_peak"] > 0
            else:  # not timed: emulated bf16 says nothing about extraction, which runs fp32
                assert f"{prefix}{path}_rois_per_s" not in result
        if bf16:
            assert result[f"{prefix}bf16_cosine_min"] >= BF16_COSINE_MIN
        else:
            assert result[f"{prefix}bf16_fraction_of_peak"] is None
            assert not any(key.startswith(f"{prefix}bf16_c") for key in result)
    peak = result["matmul_peak_bf16_gflop_per_s"]
    assert peak > 0 if bf16 else peak is None
    rows = {r["measure"]: r["met"] for r in bench_main.ratios({"backbone": result})}
    assert (rows["bf16_fraction_of_peak"] is None) is not bf16
    assert (rows["fmcib_3d_bf16_fraction_of_peak"] is None) is not bf16


def test_the_bench_sees_bf16_where_extraction_runs_bf16(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision = resolve_precision("bf16-true")
    assert precision == ("bf16-true" if bench_backbone.cpu_bf16() else "32-true")


def test_a_target_recorded_as_none_is_reported_not_measured() -> None:
    rows = bench_main.ratios({"backbone": {"bf16_fraction_of_peak": None,
                                           "fp32_fraction_of_peak": 0.49}})
    assert [(r["measure"], r["value"], r["ratio"], r["met"]) for r in rows] == [
        ("bf16_fraction_of_peak", None, None, None),
        ("fp32_fraction_of_peak", 0.49, pytest.approx(0.7), False)]
    table = bench_main._targets_table(rows)
    assert "| backbone | `bf16_fraction_of_peak` | ≥ 0.75 | — | — | not measured |" in table
    assert "| backbone | `fp32_fraction_of_peak` | ≥ 0.7 | 0.49 | 0.70 | missed |" in table


def _predict(precision: str, images: torch.Tensor) -> torch.Tensor:
    """Embeddings of ``images`` through the pipeline's Lightning path at ``precision``."""
    torch.manual_seed(0)
    net = build_backbone(name="resnet18", spatial_dims=2, in_channels=3)
    module = DeepFeatureExtractor(net, mean=[0.5] * 3, std=[0.25] * 3)
    data = [{"patient_id": f"P{i}", "image": image} for i, image in enumerate(images)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, inference_mode=True)
    batches = trainer.predict(module, DataLoader(data, batch_size=2))
    return torch.cat([b["features"] for b in batches])


def test_bf16_true_features_match_fp32_and_repeat_exactly() -> None:
    """The default fast path (bf16 weights and inputs) against fp32, within the tolerance."""
    images = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    exact = _predict("32-true", images)
    fast = _predict("bf16-true", images)
    assert fast.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(fast, exact)
    assert cosine.min() >= BF16_COSINE_MIN
    assert (fast - exact).norm() / exact.norm() <= BF16_RELATIVE_ERROR_MAX
    assert torch.equal(fast, _predict("bf16-true", images))


def test_radiomics_benchmark_reports_seconds_and_speedup_per_preset() -> None:
    """The radiomics section composes the default config and times both presets (tiny)."""
    tiny = ["dataset.generator.shape_xy=[48,48]", "dataset.generator.z_extent_mm=24.0",
            "dataset.generator.n_jobs=1", "dataset.validation.n_jobs=1"]
    result = bench_radiomics.run(n_patients=4, n_jobs=(1,), overrides=tuple(tiny))
    assert result["patients"] == 4
    for preset in ("original", "original_log"):
        assert result[f"s_per_patient_{preset}_j1"] > 0
        assert result[f"speedup_{preset}_j1"] == pytest.approx(1.0)
    assert 0 < result["features_original"] < result["features_original_log"]


def test_sweep_benchmark_runs_the_seven_studies_as_a_run_does() -> None:
    """The sweep section times every classifier's study in the sweep a run makes (studies
    side by side in worker processes): each completed its trials in its own time."""
    result = bench_sweep.run(n_patients=60, n_features=30, n_trials=2,
                             overrides=("tuning.cv_folds=3",))
    assert result["cv_folds"] == 3
    assert list(result["classifiers"]) == ["lr", "svm", "knn", "rf", "extra_trees", "xgboost",
                                           "lightgbm"]
    for name, timing in result["classifiers"].items():
        assert timing["n_trials"] == 2, name
        assert timing["wall_s"] > 0, name
        assert 0 <= timing["cv_auc"] <= 1, name
    assert result["sweep_s"] > result["selection_s"]
