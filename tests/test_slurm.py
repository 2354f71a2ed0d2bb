"""The sbatch scripts on a real one-node Slurm brought up by slurm/local-cluster.sh (serial tests).

Skipped, with the reason, where Slurm cannot be started (not root, no packages).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from .conftest import ROOT, TINY_JOB, clean_environment, run_mpi

CLUSTER = ["bash", str(ROOT / "slurm" / "local-cluster.sh")]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("bringing up Slurm needs root")
    was_running = shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo"], capture_output=True, timeout=30).returncode == 0
    up = subprocess.run([*CLUSTER, "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.skip(f"Slurm could not be started here: {(up.stderr or up.stdout)[-500:]}")
    yield
    if not was_running:
        subprocess.run([*CLUSTER, "down"], capture_output=True, timeout=60)


def sbatch(script, tmp_path, ntasks, *args, **env):
    """sbatch --wait one of slurm/'s scripts with its arguments, or a command line given as
    "--wrap=...": (process, out, err)."""
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
    target = [script] if script.startswith("--wrap=") else [str(ROOT / "slurm" / script), *args]
    proc = subprocess.run(["sbatch", "--wait", "-n", str(ntasks), "-o", str(tmp_path / "out.txt"),
                           "-e", str(tmp_path / "err.txt"), f"--export={exports}", *target],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=clean_environment())
    out = (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists() else ""
    err = (tmp_path / "err.txt").read_text() if (tmp_path / "err.txt").exists() else ""
    return proc, out, err


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_train_sbatch(slurm, tmp_path, launcher):
    job = tmp_path / "tiny.toml"
    job.write_text(TINY_JOB + f'metrics = "{tmp_path / "metrics.jsonl"}"\n')  # into [log], the last table
    proc, out, err = sbatch("train.sbatch", tmp_path, 2, JOB=job, HPC_TRAIN_LAUNCHER=launcher)
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\nout: {out}\nerr: {err}"
    assert out.count("hpc-train train: final val accuracy") == 1  # one job of 2 ranks, not 2 singletons
    summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["type"] == "summary" and summary["ranks"] == 2


def test_train_sbatch_takes_the_job_file_and_its_options_as_arguments(slurm, tmp_path):
    job = tmp_path / "tiny.toml"
    job.write_text(TINY_JOB + f'metrics = "{tmp_path / "metrics.jsonl"}"\n')
    proc, out, err = sbatch("train.sbatch", tmp_path, 2, str(job), "--set", "train.max_steps=3")
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\nout: {out}\nerr: {err}"
    summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == 3 and summary["ranks"] == 2  # that job, that option: not the demo


def test_iobench_sbatch(slurm, tmp_path):
    jobfile = tmp_path / "tiny.fio"
    jobfile.write_text(f"[t]\nrw=read\nbs=64k\nsize=1m\ndirectory={tmp_path}\nnumjobs=2\n")
    output = tmp_path / "io.json"
    proc, _, err = sbatch("iobench.sbatch", tmp_path, 2, JOBFILE=jobfile, OUTPUT=output)
    assert proc.returncode == 0, proc.stderr + err
    doc = json.loads(output.read_text())
    assert [j["jobname"] for j in doc["jobs"]] == ["t", "t"] and doc["jobs"][0]["read"]["io_bytes"] == 1 << 20


def test_failing_job_fails_the_batch_job(slurm, tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text('[model]\nname = "mlp"\n[train]\nepoch = 1\n')
    proc, _, err = sbatch("train.sbatch", tmp_path, 2, JOB=job)
    assert proc.returncode != 0 and "unknown key 'train.epoch'" in err


def test_scaling_sbatch_runs_a_study_as_job_steps(slurm, tmp_path):
    job = tmp_path / "tiny.toml"
    job.write_text(TINY_JOB)
    study = tmp_path / "study.toml"
    study.write_text(f'[study]\njob = "{job}"\nmode = "weak"\nranks = [1, 2]\nper_rank_batch = 16\n'
                     f'repeats = 1\nsteps = 4\nwarmup_steps = 1\ntimeout_s = 120\nbench = []\n')
    proc, out, err = sbatch("scaling.sbatch", tmp_path, 2, STUDY=study, OUT=tmp_path / "report")
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\nout: {out}\nerr: {err}"
    report = json.loads((tmp_path / "report" / "study.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"]
    assert all(run["command"][0] == "srun" for run in report["runs"])  # job steps of the allocation
    assert "| 2 | 1 x 2 | ok |" in (tmp_path / "report" / "table.md").read_text()


TORCH_JOB = TINY_JOB.replace('name = "mlp"\nwidths = [3072, 32, 10]',
                             'name = "torch"\nfactory = "hpc_train.torch.models:mlp"\n'
                             'kwargs = {widths = [3072, 32, 10]}')


def test_train_sbatch_trains_a_torch_job_unchanged(slurm, tmp_path):
    pytest.importorskip("torch")
    job = tmp_path / "torch.toml"
    job.write_text(TORCH_JOB + f'metrics = "{tmp_path / "metrics.jsonl"}"\n')
    proc, out, err = sbatch("train.sbatch", tmp_path, 2, JOB=job)
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\nout: {out}\nerr: {err}"
    summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["type"] == "summary" and summary["ranks"] == 2 and summary["parameters"] == 98_666


def test_an_unchanged_ddp_script_over_hpc_under_srun(slurm, tmp_path):
    pytest.importorskip("torch")
    from .test_torch_backend_launch import SCRIPT

    plugins = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30)
    if "pmix" not in plugins.stdout + plugins.stderr:
        pytest.skip("this Slurm offers no pmix: srun cannot launch an MPI program here")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(backend="hpc"))
    proc, out, err = sbatch(f"--wrap=srun --mpi=pmix {ROOT / '.venv' / 'bin' / 'python'} {script}", tmp_path, 2)
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\nout: {out}\nerr: {err}"
    assert sorted(re.findall(r"rank \d of 2 on hpc: sum \[3\.0, 3\.0\]", out)) == [
        "rank 0 of 2 on hpc: sum [3.0, 3.0]", "rank 1 of 2 on hpc: sum [3.0, 3.0]"], out + err


def test_the_local_cluster_has_the_hardwares_cpus_under_omp_num_threads_1(slurm, tmp_path):
    """nproc honours OMP_NUM_THREADS (1 in most HPC jobs): a node of CPUs=1 left 2-task jobs pending."""
    subprocess.run([*CLUSTER, "down"], capture_output=True, timeout=60)
    up = subprocess.run([*CLUSTER, "up"], capture_output=True, text=True, timeout=300,
                        env={**clean_environment(), "OMP_NUM_THREADS": "1"})
    assert up.returncode == 0, up.stderr
    node = subprocess.run(["scontrol", "show", "node"], capture_output=True, text=True, timeout=30).stdout
    assert f"CPUTot={os.cpu_count()}" in node, node
    proc, out, err = sbatch("--wrap=srun hostname", tmp_path, 2)
    assert proc.returncode == 0 and len(out.split()) == 2, proc.stderr + out + err


def signalled_batch_job(tmp_path, metrics, *sbatch_options, after_steps=20):
    """sbatch --wait slurm/train.sbatch on LONG_JOB with `sbatch_options`; once `after_steps` steps are
    logged, Slurm's warning of an ending job: USR1 to the batch shell. (process, job id)."""
    from .test_preemption import write_job

    job = write_job(tmp_path, "run", 600)
    proc = subprocess.Popen(["sbatch", "--wait", "--parsable", "-n", "2", "-o", str(tmp_path / "out.txt"),
                             "-e", str(tmp_path / "err.txt"), *sbatch_options, str(ROOT / "slurm" / "train.sbatch"),
                             str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=clean_environment())
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count('"type": "step"') >= after_steps):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    job_id = proc.stdout.readline().strip()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    proc.wait(timeout=max(1, deadline - time.monotonic()))
    return proc, job_id


def assert_one_continuous_run(tmp_path, metrics):
    """The metrics of a preempted and resumed batch job read as one run, bit-equal to an uninterrupted run."""
    from .test_preemption import records, step_losses, write_job

    reference = write_job(tmp_path, "reference", 600)
    ran = run_mpi(2, [str(ROOT / ".venv" / "bin" / "hpc-train"), "train", str(reference)], timeout=300)
    assert ran.returncode == 0, ran.stderr
    run = records(metrics)
    assert [r["type"] for r in run].count("preempted") == 1 and run[-1]["type"] == "summary"
    assert {r["attempt"] for r in run} == {0, 1} and len({r["run_id"] for r in run}) == 1
    assert step_losses(metrics) == step_losses(tmp_path / "reference.jsonl")
    out = (tmp_path / "out.txt").read_text()  # --open-mode=append: both attempts' output in one file
    assert out.index("stopped by SIGUSR1") < out.index("hpc-train train: final val accuracy")


def test_a_warned_batch_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    metrics = tmp_path / "run.jsonl"
    proc, job_id = signalled_batch_job(tmp_path, metrics)
    assert proc.returncode == 0, (tmp_path / "err.txt").read_text()
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in shown and "JobState=COMPLETED" in shown, shown
    assert "requeueing (restart 1)" in (tmp_path / "err.txt").read_text()
    assert_one_continuous_run(tmp_path, metrics)


def test_a_batch_job_that_may_not_be_requeued_resubmits_itself(slurm, tmp_path):
    metrics = tmp_path / "run.jsonl"
    proc, job_id = signalled_batch_job(tmp_path, metrics, "--no-requeue")
    assert proc.returncode == 75  # this job ended preempted; its successor runs after it
    deadline = time.monotonic() + 300
    while '"type": "summary"' not in metrics.read_text():
        assert time.monotonic() < deadline, (tmp_path / "err.txt").read_text()
        time.sleep(0.5)
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(0.5)  # the successor's batch shell is done with the output files
    assert "requeue refused" in (tmp_path / "err.txt").read_text()
    assert_one_continuous_run(tmp_path, metrics)


def test_the_elastic_batch_job_restarts_a_step_that_lost_a_rank(slurm, tmp_path):
    """slurm/elastic.sbatch: the supervisor runs the job as a step of the allocation; a rank killed
    mid-training fails the step, and the supervisor starts it again from the newest checkpoint."""
    from .test_preemption import records, write_job

    job = write_job(tmp_path, "run", 300)
    metrics = tmp_path / "run.jsonl"
    proc = subprocess.Popen(["sbatch", "--wait", "-n", "2", "-o", str(tmp_path / "out.txt"), "-e",
                             str(tmp_path / "err.txt"), str(ROOT / "slurm" / "elastic.sbatch"), str(job),
                             "--set", "checkpoint.every_steps=25"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=clean_environment())
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count('"type": "step"') >= 40):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-f", rf"^\S*python\S* -m hpc_train.cli train {job}"], capture_output=True,
                           text=True).stdout.split()  # not srun's, nor the supervisor's (train --elastic JOB)
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[0]), 9)
    proc.wait(timeout=max(1, deadline - time.monotonic()))
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "elastic: attempt 0: 2 ranks" in err and "elastic: restart 1 of 3" in err, err[-3000:]
    run = records(metrics)
    restart = next(r for r in run if r["type"] == "restart")
    assert restart["ranks"] == 2 and restart["lost_hosts"] == [] and restart["checkpoint"] is not None
    assert run[-1]["type"] == "summary" and run[-1]["steps"] == 300
    assert {r["step"] for r in run if r["type"] == "step"} == set(range(1, 301))


def test_the_local_cluster_leaves_a_real_installation_alone(tmp_path):
    """A slurm.conf that local-cluster.sh did not write is refused, byte for byte unchanged."""
    real = tmp_path / "slurm.conf"
    real.write_text("ClusterName=production\nSlurmctldHost=head01\n")
    proc = subprocess.run([*CLUSTER, "up"], capture_output=True, text=True, timeout=60,
                          env={**clean_environment(), "SLURM_CONF": str(real), "SLURM_LOCAL_DIR": str(tmp_path / "s")})
    assert proc.returncode == 3 and "was not written by this script" in proc.stderr, proc.stderr
    assert real.read_text() == "ClusterName=production\nSlurmctldHost=head01\n" and not (tmp_path / "s").exists()


@pytest.mark.parametrize("script", [["local-cluster.sh", "up"], ["netns-nodes.sh", "up", "1"]])
def test_state_directories_that_others_could_write_are_refused(tmp_path, script):
    if os.geteuid() != 0:
        pytest.skip("the scripts run as root")
    planted = tmp_path / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    env = {**clean_environment(), "SLURM_CONF": str(tmp_path / "slurm.conf"), "SLURM_LOCAL_DIR": str(planted),
           "HPC_TRAIN_NETNS_DIR": str(planted)}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / script[0]), *script[1:]], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1 and f"{planted} is not a private directory of root" in proc.stderr, proc.stderr
    assert list(planted.iterdir()) == [] and not (tmp_path / "slurm.conf").exists()


def test_the_local_cluster_stops_only_daemons_it_started(tmp_path):
    """A PID file that names another process (reused PID, planted file) does not get it killed."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (state / "d.pid").write_text(f"{bystander.pid}\n")
        proc = subprocess.run([*CLUSTER, "down"], capture_output=True, text=True, timeout=60,
                              env={**clean_environment(), "SLURM_LOCAL_DIR": str(state)})
        assert proc.returncode == 0, proc.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
