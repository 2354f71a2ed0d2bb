"""`hpc-train scale`: run a scaling study and report it beside the cost model, or only predict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .. import preemption
from ..errors import JobFileError
from ..optim.factory import uses_node_shared
from . import model as cost_model
from . import report
from .study import child_environment, cores, launch_prefix, load_study, run_study, study_from_table, summarize

BENCH_ARGS = ["-b", "4K", "-e", "64M", "-f", "4", "-r", "3", "-a", "mpi,ring,shm"]


def parse_ranks(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; '2,...,4096' -> doubling from 2 to 4096."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if len(parts) == 3 and parts[1] == "...":
            first, last = int(parts[0]), int(parts[2])
            ranks = []
            while first <= last:
                ranks.append(first)
                first *= 2
        else:
            ranks = [int(p) for p in parts]
    except ValueError:
        raise JobFileError(f"--ranks {text!r}: expected a list like 1,2,4 or 2,...,4096") from None
    if not ranks or min(ranks) < 1:
        raise JobFileError(f"--ranks {text!r}: rank counts must be positive")
    return ranks


def measure_bench(study, out: Path, nodes: int, reuse: bool = False) -> Path | None:
    """One `hpc-train bench allreduce` at 2 ranks (on one node, or over 2 pretended/real nodes);
    with `reuse`, the one an earlier attempt of the study measured."""
    path = out / f"bench_{'intra' if nodes == 1 else 'inter'}.json"
    if reuse and path.exists():
        return path
    env = child_environment(study, 2)
    if nodes == 1:
        env.pop("HPC_TRAIN_RANKS_PER_NODE", None)
    else:
        env["HPC_TRAIN_RANKS_PER_NODE"] = "1"
    command = [*launch_prefix(study, 2), sys.executable, "-m", "hpc_train.cli", "bench", "allreduce", *BENCH_ARGS,
               "--json", str(path)]
    if nodes > 1:
        command[-3] = "mpi,ring"  # no shm across nodes
    log = out / f"{path.stem}.log"
    with log.open("w") as sink:
        try:
            rc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                timeout=study.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not path.exists():
        print(f"hpc-train scale: the allreduce benchmark failed ({rc}); see {log}", file=sys.stderr)
        return None
    return path


def build_model(benches: list[str], link: str) -> cost_model.Model:
    model = cost_model.fit(benches) if benches else cost_model.Model(gamma=cost_model.measure_gamma())
    if link:
        inter = cost_model.parse_link(link)
        model.links[cost_model.INTER] = {"ring": inter, "mpi": inter}
        model.sources.append(f"--link {link}")
    return model


def run(args) -> int:
    overrides = {}
    if args.ranks:
        overrides["ranks"] = parse_ranks(args.ranks)
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.link:
        overrides["link"] = args.link
    if args.study:
        study = load_study(args.study, overrides)
    else:
        job, mode = (args.strong, "strong") if args.strong else (args.weak, "weak")
        if not job or "ranks" not in overrides:
            raise JobFileError("hpc-train scale: give a study file, or --ranks with --strong JOB or --weak JOB")
        study = study_from_table({**overrides, "job": str(Path(job).resolve()), "mode": mode}, Path("command line"))
    name = Path(args.study).stem if args.study else f"{study.mode}-{Path(study.job).stem}"
    out = Path(args.out or f"results/scaling/{name}")
    out.mkdir(parents=True, exist_ok=True)
    benches = [b for b in study.bench if b != "auto"]
    if "auto" in study.bench:
        measured = [measure_bench(study, out, 1, args.resume)]
        if study.ranks_per_node and max(study.ranks) > study.ranks_per_node and not study.link:
            measured.append(measure_bench(study, out, 2, args.resume))
        benches += [str(m) for m in measured if m]
    model = build_model(benches, study.link)
    records = run_study(study, out, resume=args.resume)
    if preemption.received():
        print(f"hpc-train scale: {preemption.signal_name(preemption.received())} received: stopped after "
              f"{len(records)} of {study.repeats * len(study.ranks)} runs (kept in {out / 'runs.jsonl'}); "
              f"`--resume` continues (exit code {preemption.EXIT_PREEMPTED}: preempted)", file=sys.stderr)
        return preemption.EXIT_PREEMPTED
    rows = summarize(study, records)
    parameters = next((r["parameters"] for r in records if r.get("parameters")), None)
    core_count = study.cores_per_node or cores()
    bucket = int(study.base_job.distributed.bucket_mb * (1 << 20))
    stage = study.base_job.distributed.zero_stage
    work, calibration = (None, {})
    predicted = []
    if not model.links.get(cost_model.INTRA):
        print("# no predictions: the model has no intra-node level (study.bench is empty)")
    elif parameters:
        work, calibration = report.calibrate(model, rows, parameters, bucket, core_count, study.ranks_per_node,
                                             node_shared=uses_node_shared(study.base_job))
    if work is not None:
        report.add_predictions(model, work, rows, study.ranks_per_node, stage)
        if study.predict_ranks:
            base = next(r for r in rows if "step_ms" in r)
            from dataclasses import replace

            cluster = replace(work, cores_per_node=study.nodes_of)  # one core per rank on a cluster node
            predicted = report.predictions(model, cluster, study.predict_ranks, study.nodes_of, study.mode,
                                           base["per_rank_batch"], base["ranks"], stage)
    title = f"{study.mode} scaling, {Path(study.job).name}"
    table = report.markdown(rows, study.ranks_per_node)
    print(f"# {title}: median of {study.repeats} interleaved repeats, {study.steps} timed steps after "
          f"{study.warmup_steps} warm-up; {core_count} cores per node")
    if calibration:
        print(f"# model calibrated on: compute/data from {calibration['compute']} rank(s)"
              + (f", exposure {work.exposure:.2f} and skew {work.skew:.3f} from {calibration['exposure']} ranks"
                 if "exposure" in calibration
                 else "") + f"; links {_links(model)}")
    print(table)
    if predicted:
        print(f"\n# predicted, nodes of {study.nodes_of} ranks, inter-node link "
              f"{study.link or 'fitted'}, ZeRO stage {stage}")
        print(report.prediction_markdown(predicted))
    pngs = report.plots(rows, predicted, out, title)
    (out / "table.md").write_text(table + "\n")
    report.write_json(out / "study.json", {
        "study": str(study.path), "job": str(study.job), "mode": study.mode, "repeats": study.repeats,
        "steps": study.steps, "warmup_steps": study.warmup_steps, "cores_per_node": core_count,
        "ranks_per_node": study.ranks_per_node, "parameters": parameters, "zero_stage": stage,
        "rows": rows, "runs": records, "model": model.to_json(), "calibration": calibration,
        "workload": vars(work) if work else None, "predicted": predicted, "plots": pngs})
    print(f"# wrote {out / 'study.json'}, {out / 'table.md'}" + (f", {', '.join(pngs)}" if pngs else
                                                                  " (no plots: matplotlib is not installed)"))
    return 0 if all("step_ms" in r for r in rows) else 1


def _links(model: cost_model.Model) -> str:
    return "; ".join(f"{level}/{name} {link.describe()}" for level, links in model.links.items()
                     for name, link in links.items())


def predict_only(args) -> int:
    """`--predict`: the table (and plots) for any rank counts and node shape, from a study or given numbers."""
    import json

    ranks = parse_ranks(args.ranks or "1,...,4096")
    source = json.loads(Path(args.from_study).read_text()) if args.from_study else None
    benches = list(args.bench)
    if source and not benches:
        benches = [s for s in source["model"]["sources"] if not s.startswith("--link")]
    if not benches and not args.link:
        raise JobFileError("hpc-train scale --predict: give --link (and --bench or --from for the intra-node level)")
    model = build_model(benches, args.link)
    if not model.links.get(cost_model.INTRA):
        intra = cost_model.parse_link(args.link)
        model.links[cost_model.INTRA] = {"ring": intra, "mpi": intra}
    if source and source.get("workload"):
        work = cost_model.Workload(**source["workload"])
        mode, batch = source["mode"], source["rows"][0]["per_rank_batch"]
        base_ranks = source["rows"][0]["ranks"]
    elif args.params and args.compute_ms_per_sample:
        work = cost_model.Workload(parameters=int(args.params), compute_s_per_sample=args.compute_ms_per_sample / 1e3,
                                   batch_per_rank=args.batch, exposure=args.exposure)
        mode, batch, base_ranks = args.mode, args.batch, 1
    else:
        raise JobFileError("hpc-train scale --predict: give --from STUDY.json, or --params and "
                           "--compute-ms-per-sample")
    work.cores_per_node = args.nodes_of
    stage = args.stage if args.stage is not None else (source or {}).get("zero_stage", 0)
    predicted = report.predictions(model, work, ranks, args.nodes_of, mode, batch, base_ranks, stage)
    print(f"# predicted {mode} scaling: {work.parameters} parameters, {1e3 * work.compute_s_per_sample:.4f} ms "
          f"compute per sample, batch {batch} per rank, exposure {work.exposure:.2f}, skew {work.skew:.3f}, "
          f"ZeRO stage {stage}, nodes of "
          f"{args.nodes_of} ranks; links {_links(model)}")
    print(report.prediction_markdown(predicted))
    for size, algorithm in cost_model.best_algorithms(model, max(1, ranks[-1] // args.nodes_of),
                                                      min(ranks[-1], args.nodes_of)).items():
        print(f"# best allreduce for {size} B at {ranks[-1]} ranks: {algorithm}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        pngs = report.plots([], predicted, out, f"predicted {mode} scaling")
        report.write_json(out / "prediction.json", {"model": model.to_json(), "workload": vars(work),
                                                     "predicted": predicted, "plots": pngs})
        print(f"# wrote {out / 'prediction.json'}" + (f", {', '.join(pngs)}" if pngs else ""))
    return 0


def main(args) -> int:
    if args.predict:
        return predict_only(args)
    preemption.watch()  # a study under sbatch is told of its end by USR1 (slurm/scaling.sbatch passes it on)
    try:
        return run(args)
    finally:
        preemption.unwatch()
