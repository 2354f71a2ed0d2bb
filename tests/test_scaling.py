"""Scaling: the cost model's formulas and fit, `hpc-train scale --predict`, and real studies under mpirun
(failed and timed-out configurations reported, the study going on; a preempted study resumed)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpc_train.errors import JobFileError
from hpc_train.scaling import model as m
from hpc_train.scaling import report
from hpc_train.scaling.command import parse_ranks

from .conftest import ROOT, TINY_JOB, clean_environment, python_cmd


def test_cost_forms_follow_the_textbook_formulas():
    p, n = 8, 1 << 20
    link, gamma = m.Link(alpha=2e-6, beta=1e-10), 1e-11
    share = n * (p - 1) / p
    assert m.cost("ring", p, n, link, gamma) == pytest.approx(2 * 7 * 2e-6 + 2 * share * 1e-10 + share * 1e-11)
    assert m.cost("recursive_doubling", p, n, link, gamma) == pytest.approx(3 * 2e-6 + 3 * n * (1e-10 + 1e-11))
    assert m.cost("rabenseifner", p, n, link, gamma) == pytest.approx(6 * 2e-6 + 2 * share * 1e-10 + share * 1e-11)
    # a ring allreduce is a ring reduce-scatter plus a ring allgather
    assert m.cost("ring", p, n, link, gamma) == pytest.approx(
        m.cost("reduce_scatter", p, n, link, gamma) + m.cost("allgather", p, n, link, gamma))
    assert m.cost("ring", 1, n, link, gamma) == 0


def test_fit_recovers_the_link_a_sweep_was_made_with(tmp_path):
    truth, gamma = {"ring": m.Link(9e-6, 1.5e-10), "shm": m.Link(8e-7, 2.5e-11), "mpi": m.Link(2e-6, 1.8e-10)}, 7e-11
    forms = {"ring": "ring", "shm": "shm", "mpi": "rabenseifner"}
    results = [{"size": n, "algorithm": a, "time_us": 1e6 * m.cost(forms[a], 2, n, truth[a], gamma), "wrong": 0}
               for a in truth for n in (8, 4096, 1 << 20, 64 << 20)]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"machine": {"ranks": 2, "nodes": 1}, "results": results}))
    fitted = m.fit([str(bench)], gamma=gamma)
    for algorithm, link in truth.items():
        got = fitted.links["intra"][algorithm]  # beta per node: the sweep's 2 ranks shared it
        assert got.alpha == pytest.approx(link.alpha, rel=1e-6) and 2 * got.beta == pytest.approx(link.beta, rel=1e-6)
        assert fitted.fit_error[f"intra/{algorithm}"] < 1e-9


def test_links_and_rank_lists_parse_or_say_why():
    link = m.parse_link("alpha=2us,bw=12.5GB/s")
    assert link.alpha == pytest.approx(2e-6) and link.beta == pytest.approx(1 / 12.5e9)
    assert m.parse_link("alpha=1.5ms,bw=100Gbit/s").beta == pytest.approx(8 / 100e9)
    with pytest.raises(ValueError, match="alpha needs a unit"):
        m.parse_link("alpha=2,bw=1GB/s")
    with pytest.raises(ValueError, match="expected 'alpha=<time>,bw=<rate>'"):
        m.parse_link("latency=2us")
    assert parse_ranks("2,...,4096") == [2 ** k for k in range(1, 13)]
    assert parse_ranks("1,3,5") == [1, 3, 5]
    with pytest.raises(JobFileError, match="expected a list like"):
        parse_ranks("1,x")


def test_the_best_algorithm_per_regime():
    intra = {"shm": m.Link(8e-7, 1e-11), "ring": m.Link(1e-5, 2e-11), "mpi": m.Link(2e-6, 2e-11)}
    tcp = m.Link(5e-5, 8e-11)  # a high-latency network between nodes
    model = m.Model(gamma=5e-11, links={"intra": intra, "inter": {"ring": tcp, "mpi": tcp}})
    assert m.best_algorithms(model, 1, 8)[64 << 20] == "shm"  # inside a node: the shared window
    regimes = m.best_algorithms(model, 128, 8)
    assert regimes[1 << 10] == regimes[1 << 20] == "mpi"  # recursive doubling's lg p latency terms
    assert regimes[64 << 20] == "hierarchical"  # a node's ranks share one flow over the network
    n = 64 << 20
    costs = m.allreduce_costs(model, 128, 8, n)
    window = m.cost("shm", 8, n, m.Link(8e-7, 8e-11), 5e-11) + n * 8e-11  # reduce in, copy out of the window
    assert costs["hierarchical"] == pytest.approx(m.cost("ring", 128, n, tcp, 5e-11) + window)
    work = m.Workload(parameters=25_000_000, compute_s_per_sample=1e-3, batch_per_rank=32, cores_per_node=8)
    steps = [m.predict(model, work, nodes, 8)["step_s"] for nodes in (1, 8, 64, 512)]
    assert steps == sorted(steps)  # weak scaling: never faster with more ranks
    zero = [m.predict(model, work, 8, 8, stage)["comm_s"] for stage in (0, 2, 3)]
    assert zero[2] > zero[1] > 0  # stage 3 gathers the parameters twice more


def test_node_shared_reduces_pieces_and_divides_the_update():
    shm, tcp, gamma = m.Link(8e-7, 1e-11), m.Link(5e-5, 8e-11), 5e-11
    model = m.Model(gamma=gamma, links={"intra": {"shm": shm, "ring": shm, "mpi": shm},
                                        "inter": {"ring": tcp, "mpi": tcp}})
    n, q = 4 << 20, 8
    piece = m.cost("shm_reduce_scatter", q, n, m.Link(8e-7, 8e-11), gamma)
    assert m.terms("shm_reduce_scatter", q, n) == (6, n * (1 + 1 / q), n * (q - 1) / q)
    assert m.node_shared_cost(model, 1, q, n) == pytest.approx(piece)
    # across nodes: the pieces' rings, q of them through one NIC
    assert m.node_shared_cost(model, 16, q, n) == pytest.approx(
        piece + m.cost("ring", 16, n / q, m.Link(5e-5, 8 * 8e-11), gamma))
    work = m.Workload(parameters=1_000_000, compute_s_per_sample=1e-4, batch_per_rank=32, cores_per_node=q,
                      bucket_bytes=n, update_s=4e-3, node_shared=True)
    shared = m.predict(model, work, 1, q)
    assert shared["algorithm"] == "node-shared"
    assert shared["compute_s"] == pytest.approx(32e-4 + 4e-3 / q)  # each rank updates 1/q of the copy
    replicated = m.predict(model, m.Workload(**{**vars(work), "node_shared": False}), 1, q)
    assert replicated["compute_s"] == pytest.approx(32e-4 + 4e-3) and replicated["algorithm"] != "node-shared"
    assert m.predict(model, work, 1, q, stage=1)["compute_s"] == pytest.approx(32e-4 + 4e-3 / q)  # ZeRO: 1/p


def test_calibration_splits_the_update_and_the_wait_for_the_slowest_rank():
    shm = m.Link(8e-7, 2e-11)
    model = m.Model(gamma=5e-11, links={"intra": {"shm": shm, "ring": shm, "mpi": shm}})
    rows = [{"ranks": 1, "per_rank_batch": 64, "step_ms": 23.0, "compute_ms": 22.5, "data_ms": 0.5,
             "update_ms": 3.5, "backward_fraction": 0.5},
            {"ranks": 2, "per_rank_batch": 64, "step_ms": 30.0, "compute_ms": 22.0, "data_ms": 0.5}]
    work, used = report.calibrate(model, rows, 3_700_000, 4 << 20, 2, 0, node_shared=True)
    assert used == {"compute": 1, "exposure": 2}
    assert work.update_s == pytest.approx(3.5e-3) and work.compute_s_per_sample == pytest.approx(19e-3 / 64)
    # 2 ranks add far more than their whole reduction: the rest is waiting for the slower rank
    assert work.exposure == 1.0 and work.skew > 0
    assert m.predict(model, work, 1, 2)["step_s"] == pytest.approx(30e-3)
    assert m.predict(model, work, 1, 1)["step_s"] == pytest.approx(23e-3)


def scale(*args, timeout=600):
    return subprocess.run(python_cmd("-m", "hpc_train.cli", "scale", *args), capture_output=True, text=True,
                          env=clean_environment(), cwd=ROOT, timeout=timeout)


def test_predict_to_4096_ranks(tmp_path):
    proc = scale("--predict", "--ranks", "2,...,4096", "--nodes-of", "8", "--link", "alpha=2us,bw=12.5GB/s",
                 "--params", "3.7e6", "--compute-ms-per-sample", "0.16", "--batch", "128", "--exposure", "0.5",
                 "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "| 4096 | 512 x 8 |" in proc.stdout and "best allreduce for" in proc.stdout
    rows = json.loads((tmp_path / "prediction.json").read_text())["predicted"]
    assert [r["ranks"] for r in rows] == [2 ** k for k in range(1, 13)]
    assert all(0 < r["efficiency"] <= 1 for r in rows)
    assert (tmp_path / "efficiency.png").stat().st_size > 0
    bad = scale("--predict", "--ranks", "2,4", "--params", "1e6", "--compute-ms-per-sample", "1")
    assert bad.returncode == 2 and "give --link" in bad.stderr


def write_study(tmp_path, job=TINY_JOB, **keys):
    (tmp_path / "job.toml").write_text(job)
    lines = ["[study]", 'job = "job.toml"'] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_study_reports_measured_and_predicted_side_by_side(tmp_path):
    study = write_study(tmp_path, mode="weak", ranks=[1, 2], per_rank_batch=16, repeats=2, steps=6, warmup_steps=2,
                        timeout_s=120, predict_ranks=[1, 2, 64], link="alpha=2us,bw=12.5GB/s")
    proc = scale(str(study), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "study.json").read_text())
    rows = {r["ranks"]: r for r in report["rows"]}
    assert rows[1]["status"] == rows[2]["status"] == "ok" and rows[2]["repeats_ok"] == 2
    assert rows[2]["global_batch"] == 32 and rows[2]["per_rank_batch"] == 16
    for r in rows.values():
        assert r["step_ms"] > 0 and abs(r["error"]) < 0.25  # predicted within 25% at the measured counts
        assert r["compute_ms"] + r["exposed_ms"] + r["data_ms"] == pytest.approx(r["step_ms"])
    assert report["parameters"] == 3072 * 32 + 32 + 32 * 10 + 10
    assert [r["ranks"] for r in report["predicted"]] == [1, 2, 64]
    assert {"intra/mpi", "intra/ring", "intra/shm"} <= set(report["model"]["fit_error"])
    for png in ("speedup.png", "efficiency.png", "time_split.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0
    assert "| 2 | 1 x 2 | ok |" in (tmp_path / "out" / "table.md").read_text()


def test_the_calibrated_model_predicts_a_rank_count_it_was_not_fitted_on(tmp_path):
    """Calibrated on 1 and 2 ranks, checked at 4 (two per core here: oversubscribed, hence the tolerance of a
    factor of two; measured +12% to +26% on an idle machine, +130% once while another install ran). A model
    big enough that a step is mostly compute, not noise; three repeats of 12 steps, because a 2-rank run
    whose ranks computed twice as slowly as alone for a few seconds (seen twice in one session, 6 steps and
    two repeats) made the calibration predict 4 ranks at 2.8-3.5x what they took."""
    study = write_study(tmp_path, job=TINY_JOB.replace("widths = [3072, 32, 10]", "widths = [3072, 256, 10]"),
                        mode="weak", ranks=[1, 2, 4], per_rank_batch=32, repeats=3, steps=12, warmup_steps=2,
                        timeout_s=120, link="alpha=2us,bw=12.5GB/s")
    proc = scale(str(study), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "study.json").read_text())
    assert report["calibration"] == {"compute": 1, "exposure": 2}  # 4 ranks were not used to fit
    four = next(r for r in report["rows"] if r["ranks"] == 4)
    assert four["status"] == "ok" and abs(four["error"]) < 1.0, four


def test_failed_and_timed_out_configurations_are_reported_and_the_study_goes_on(tmp_path):
    study = write_study(tmp_path, mode="strong", ranks=[1, 2, 8], global_batch=12, repeats=1, steps=3,
                        warmup_steps=1, bench=[])  # 12 samples do not split over 8 ranks: that run fails
    proc = scale(str(study), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["ranks"]: r for r in json.loads((tmp_path / "out" / "study.json").read_text())["rows"]}
    assert rows[1]["status"] == rows[2]["status"] == "ok"
    assert rows[8]["status"] == "failed" and "not divisible by the 8 ranks" in Path(rows[8]["log"]).read_text()
    assert "failed: exit code 2" in (tmp_path / "out" / "table.md").read_text()
    slow = write_study(tmp_path, mode="weak", ranks=[1], repeats=1, steps=3, timeout_s=0.5, bench=[])
    proc = scale(str(slow), "--out", str(tmp_path / "slow"))
    rows = json.loads((tmp_path / "slow" / "study.json").read_text())["rows"]
    assert proc.returncode == 1 and rows[0]["status"] == "timed out" and rows[0]["log"].endswith("log.txt")


@pytest.mark.parametrize("text, message", [
    ('[study]\njob = "job.toml"\nmode = "weak"\nranks = [1]\nrepets = 3\n',
     r"unknown key 'study.repets' \(did you mean 'repeats'\?\)"),
    ('[study]\njob = "job.toml"\nmode = "fast"\nranks = [1]\n', r"'study.mode' = 'fast': expected one of"),
    ('[study]\njob = "job.toml"\nmode = "weak"\nranks = [0, 2]\n', r"'study.ranks' must be a list of positive"),
    ('[study]\njob = "nope.toml"\nmode = "weak"\nranks = [1]\n', r"nope.toml: job file not found"),
])
def test_bad_study_files_name_the_key(tmp_path, text, message):
    from hpc_train.scaling.study import load_study

    (tmp_path / "job.toml").write_text(TINY_JOB)
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(JobFileError, match=message):
        load_study(tmp_path / "s.toml")


@pytest.mark.parametrize("name", ["mlp_weak.toml", "cnn_strong.toml"])
def test_shipped_studies_are_valid(name):
    from hpc_train.scaling.study import load_study

    study = load_study(ROOT / "jobs" / "scaling" / name)
    assert study.ranks == [1, 2, 4] and study.job.exists() and study.link


def test_a_preempted_study_stops_and_resume_runs_only_what_is_left(tmp_path):
    study = write_study(tmp_path, mode="weak", ranks=[1, 2], per_rank_batch=16, repeats=2, steps=6, warmup_steps=2,
                        timeout_s=120, bench=[])
    out, journal = tmp_path / "out", tmp_path / "out" / "runs.jsonl"
    proc = subprocess.Popen(python_cmd("-m", "hpc_train.cli", "scale", str(study), "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_environment(),
                            cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (journal.exists() and journal.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    before = [json.loads(line) for line in journal.read_text().splitlines()]
    assert 1 <= len(before) < 4 and "`--resume` continues" in err
    assert not (out / "study.json").exists()  # no report from a partial study
    resumed = scale(str(study), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("kept from an earlier attempt") == len(before)
    runs = json.loads((out / "study.json").read_text())["runs"]
    assert sorted((r["ranks"], r["repeat"]) for r in runs) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r in runs for r in before)  # the same records, wall times included: not run again
