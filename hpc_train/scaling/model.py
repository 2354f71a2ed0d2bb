"""An alpha-beta-gamma cost model of our collectives, fitted to measurements, predicting step times.

Costs (p ranks, n bytes; alpha s per message, beta s per byte moved, gamma s per
byte reduced; Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication
Operations in MPICH", IJHPCA 2005):

    ring allreduce          2(p-1) a + 2n(p-1)/p b + n(p-1)/p g
    recursive doubling      lg p a   + n lg p b    + n lg p g
    Rabenseifner            2 lg p a + 2n(p-1)/p b + n(p-1)/p g
    ring reduce-scatter     (p-1) a  + n(p-1)/p (b + g)
    ring allgather          (p-1) a  + n(p-1)/p b
    shm allreduce (ours)    2 lg q a + 3n b + n(q-1)/q g   (each rank copies in, reduces a slice,
                            copies out)
    hierarchical            shm allreduce inside each node + ring across the N node leaders
                            + a copy out of the node's window (n q b_node)
    node-shared (ours)      2 lg q a + n(1 + 1/q) b + n(q-1)/q g inside the node (a rank reads
                            its piece from every rank, writes its own) + a ring allreduce of
                            n/q across the N nodes per local rank, the q rings sharing a NIC;
                            and the optimizer update is 1/q of one replica's per rank (ZeRO: 1/p)
    MPI's own               the cheapest of recursive doubling, Rabenseifner and ring
                            (Open MPI's tuned component switches among them by size); across
                            nodes the q ranks of a node exchange at once and share its link,
                            so beta counts q times (a ring ordered by node crosses each link once)

Inside a node every algorithm moves its bytes through the memory that the node's q
ranks share, so intra-node betas are per node and count q times (fitted on p ranks:
divided by p). Every level (one node's shared memory, the network between nodes) has one Link per
algorithm: our algorithms carry different software overheads, so alpha and beta are
fitted per algorithm by least squares over an `hpc-train bench allreduce` size sweep
(relative residuals, non-negative), with gamma measured separately (the reduction
rate of this machine) because one rank count cannot tell beta from gamma. Which
algorithms exist, which are fitted and which cost form each takes come from the
registry `comm.algorithms.ALLREDUCE`; the forms are `ALLREDUCE_COSTS` below.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..comm.algorithms import ALLREDUCE, for_topology

INTRA, INTER = "intra", "inter"
MPI_FORMS = ("recursive_doubling", "rabenseifner", "ring")


@dataclass(frozen=True)
class Link:
    alpha: float  # seconds per message (latency plus software overhead)
    beta: float  # seconds per byte moved (1 / bandwidth)

    def describe(self) -> str:
        bw = f"{1e-9 / self.beta:.3g} GB/s" if self.beta > 0 else "inf"
        return f"alpha={self.alpha * 1e6:.3g}us,bw={bw}"


_TIME = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE = {"gb/s": 1e9, "mb/s": 1e6, "kb/s": 1e3, "gbit/s": 1e9 / 8}


def parse_link(text: str) -> Link:
    """'alpha=2us,bw=12.5GB/s' -> Link (also ns/ms/s, MB/s, Gbit/s)."""
    fields = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        fields[key.strip().lower()] = value.strip()
    if set(fields) != {"alpha", "bw"}:
        raise ValueError(f"link {text!r}: expected 'alpha=<time>,bw=<rate>', e.g. 'alpha=2us,bw=12.5GB/s'")
    t = re.fullmatch(r"([0-9.eE+-]+)\s*(ns|us|ms|s)", fields["alpha"])
    r = re.fullmatch(r"([0-9.eE+-]+)\s*(GB/s|MB/s|kB/s|Gbit/s)", fields["bw"], re.IGNORECASE)
    if not t or not r:
        raise ValueError(f"link {text!r}: alpha needs a unit (ns, us, ms, s), bw one of GB/s, MB/s, kB/s, Gbit/s")
    bandwidth = float(r.group(1)) * _RATE[r.group(2).lower()]
    if bandwidth <= 0:
        raise ValueError(f"link {text!r}: bandwidth must be positive")
    return Link(float(t.group(1)) * _TIME[t.group(2)], 1.0 / bandwidth)


def _lg(p: int) -> float:
    return math.ceil(math.log2(p)) if p > 1 else 0.0


# -- cost terms: (alpha coefficient, beta coefficient, gamma coefficient) ---------------------------

def terms(form: str, p: int, n: float, q: int = 1) -> tuple[float, float, float]:
    """Coefficients of alpha, beta and gamma in the cost of `form` (q: ranks per node for shm)."""
    if p <= 1:
        return 0.0, 0.0, 0.0
    share = n * (p - 1) / p
    if form == "ring":
        return 2 * (p - 1), 2 * share, share
    if form == "recursive_doubling":
        return _lg(p), n * _lg(p), n * _lg(p)
    if form == "rabenseifner":
        return 2 * _lg(p), 2 * share, share
    if form == "reduce_scatter":
        return p - 1, share, share
    if form == "allgather":
        return p - 1, share, 0.0
    if form == "shm":
        return 2 * _lg(p), 3 * n, share
    if form == "shm_reduce_scatter":
        return 2 * _lg(p), n * (1 + 1 / p), share
    raise ValueError(f"no cost form {form!r}")


def cost(form: str, p: int, n: float, link: Link, gamma: float) -> float:
    a, b, g = terms(form, p, n)
    return a * link.alpha + b * link.beta + g * gamma


# -- fitting -------------------------------------------------------------------------------------

def measure_gamma(nbytes: int = 4 << 20, repeats: int = 20) -> float:
    """Seconds per byte of float32 element-wise addition on this machine (median of repeats)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.ones_like(a)
    np.add(a, b, out=a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.add(a, b, out=a)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / nbytes


def fit_link(samples: list[tuple[int, float]], form: str, p: int, gamma: float) -> tuple[Link, float]:
    """Least-squares (alpha, beta) >= 0 of `form` over (bytes, seconds) samples, relative residuals.

    Returns the link and the fit's relative RMS error.
    """
    rows, rhs = [], []
    for n, t in samples:
        a, b, g = terms(form, p, n)
        rows.append([a / t, b / t])
        rhs.append(1.0 - g * gamma / t)
    matrix, target = np.array(rows), np.array(rhs)
    solution = np.linalg.lstsq(matrix, target, rcond=None)[0]
    if (solution < 0).any():  # non-negative: drop the negative coefficient, refit the other
        keep = int(np.argmax(solution))
        solution = np.zeros(2)
        column = matrix[:, keep]
        solution[keep] = max(0.0, float(column @ target / (column @ column)))
    link = Link(float(solution[0]), float(solution[1]))
    predicted = np.array([cost(form, p, n, link, gamma) for n, _ in samples])
    measured = np.array([t for _, t in samples])
    return link, float(np.sqrt(np.mean(((predicted - measured) / measured) ** 2)))


@dataclass
class Model:
    """Fitted links by level and algorithm, gamma, and where they came from."""

    gamma: float
    links: dict = field(default_factory=dict)  # level -> algorithm -> Link
    fit_error: dict = field(default_factory=dict)  # "level/algorithm" -> relative RMS error
    sources: list = field(default_factory=list)

    def link(self, level: str, algorithm: str) -> Link | None:
        chosen = self.links.get(level, {})
        return chosen.get(algorithm) or chosen.get("ring") or chosen.get("mpi")

    def to_json(self) -> dict:
        links = {level: {a: asdict(k) for a, k in by.items()} for level, by in self.links.items()}
        return {"gamma": self.gamma, "links": links, "fit_error": self.fit_error, "sources": self.sources}


def _bench_form(algorithm: str) -> str:
    if algorithm == "shm":
        return "shm"
    if algorithm == "mpi":
        return "rabenseifner"  # Open MPI's large-message choice; its small messages only shift alpha
    return "ring"


def fit(bench_files: list[str], gamma: float | None = None) -> Model:
    """Fit every algorithm of every `hpc-train bench allreduce --json` file (one node: the intra
    level; several nodes: the inter level)."""
    model = Model(gamma=measure_gamma() if gamma is None else gamma)
    for path in bench_files:
        with open(path) as f:
            bench = json.load(f)
        machine = bench["machine"]
        p, nodes = machine["ranks"], machine["nodes"]
        level = INTRA if nodes == 1 else INTER
        by_algorithm: dict[str, list] = {}
        for row in bench["results"]:  # auto picks among the others; hierarchical is built from shm and ring
            algorithm = ALLREDUCE.get(row["algorithm"])
            if row["wrong"] == 0 and algorithm is not None and algorithm.fitted:
                by_algorithm.setdefault(row["algorithm"], []).append((row["size"], row["time_us"] * 1e-6))
        for algorithm, samples in by_algorithm.items():
            form = _bench_form(algorithm)
            link, error = fit_link(samples, form, p, model.gamma)
            if level == INTRA:  # per node: the p ranks of the sweep shared its memory
                link = Link(link.alpha, link.beta / p)
            model.links.setdefault(level, {})[algorithm] = link
            model.fit_error[f"{level}/{algorithm}"] = error
        model.sources.append(path)
    return model


# -- prediction ----------------------------------------------------------------------------------

def _shared(link: Link | None, ranks: int) -> Link | None:
    """The link as each of `ranks` ranks sees it when they all move bytes through it at once."""
    return None if link is None else Link(link.alpha, link.beta * ranks)


def link_for(model: Model, nodes: int, per_node: int, algorithm: str) -> Link | None:
    """One rank's view of an algorithm's link: the node's memory shared by its ranks, or, across
    nodes, whichever is slower of the network and the node's memory (a flat algorithm's steps run
    intra- and inter-node hops at once)."""
    intra = _shared(model.link(INTRA, algorithm), per_node)
    if nodes == 1:
        return intra
    inter = model.link(INTER, algorithm)
    if inter is None or intra is None:
        return inter
    return Link(max(inter.alpha, intra.alpha), max(inter.beta, intra.beta))


def _mpi_cost(model: Model, nodes: int, per_node: int, n: float) -> float | None:
    link = link_for(model, nodes, per_node, "mpi")
    if link is None:
        return None
    crowded = _shared(link, per_node if nodes > 1 else 1)  # across nodes a node's ranks share its one link
    return min(cost(form, nodes * per_node, n, crowded if form != "ring" else link, model.gamma)
               for form in MPI_FORMS)


def _ring_cost(model: Model, nodes: int, per_node: int, n: float) -> float | None:
    link = link_for(model, nodes, per_node, "ring")
    return None if link is None else cost("ring", nodes * per_node, n, link, model.gamma)


def _shm_cost(model: Model, nodes: int, per_node: int, n: float) -> float | None:
    link = _shared(model.link(INTRA, "shm"), per_node)
    return None if link is None else cost("shm", per_node, n, link, model.gamma)


def _hierarchical_cost(model: Model, nodes: int, per_node: int, n: float) -> float | None:
    inter_ring = model.link(INTER, "ring")
    if inter_ring is None:
        return None
    shm_link = _shared(model.link(INTRA, "shm"), per_node)
    inside = 0.0
    if shm_link is not None and per_node > 1:  # reduce in the node's window, later copy the result out
        inside = cost("shm", per_node, n, shm_link, model.gamma) + n * shm_link.beta
    return inside + cost("ring", nodes, n, inter_ring, model.gamma)


# The cost forms the registry's entries name (comm.algorithms.Algorithm.cost).
ALLREDUCE_COSTS = {"mpi": _mpi_cost, "ring": _ring_cost, "shm": _shm_cost, "hierarchical": _hierarchical_cost}


def allreduce_costs(model: Model, nodes: int, per_node: int, n: float) -> dict[str, float]:
    """Seconds for an allreduce of n bytes with each applicable algorithm on nodes x per_node ranks."""
    if nodes * per_node <= 1:
        return {"none": 0.0}
    costs = {}
    for name, algorithm in ALLREDUCE.items():
        if for_topology(name, nodes) != name:  # shm across nodes is hierarchical's job, and the reverse
            continue
        seconds = ALLREDUCE_COSTS[algorithm.cost](model, nodes, per_node, n)
        if seconds is not None:
            costs[name] = seconds
    if not costs:
        level = INTRA if nodes == 1 else INTER
        raise ValueError(f"the model has no link for the {level} level: fit a bench file or give --link")
    return costs


def node_shared_cost(model: Model, nodes: int, per_node: int, n: float) -> float | None:
    """Seconds for NodeSharedOptimizer's reduction of n bytes (None without an shm link)."""
    shm_link = _shared(model.link(INTRA, "shm"), per_node)
    if shm_link is None:
        return None
    seconds = cost("shm_reduce_scatter", per_node, n, shm_link, model.gamma)
    if nodes > 1:
        inter = model.link(INTER, "ring")
        if inter is None:
            return None
        seconds += cost("ring", nodes, n / per_node, _shared(inter, per_node), model.gamma)
    return seconds


def zero_costs(model: Model, nodes: int, per_node: int, n: float, stage: int,
               node_shared: bool = False) -> tuple[str, float, float]:
    """(algorithm, gradient-reduction seconds, parameter-gather seconds) per step for a ZeRO stage
    (stage 0 with node_shared: NodeSharedOptimizer, where the model has an shm link)."""
    p = nodes * per_node
    if p <= 1:
        return "none", 0.0, 0.0
    shared = node_shared_cost(model, nodes, per_node, n) if node_shared and stage == 0 else None
    if shared is not None:
        return "node-shared", shared, 0.0
    link, g = link_for(model, nodes, per_node, "ring"), model.gamma
    gather = cost("allgather", p, n, link, g)
    if stage <= 1:
        costs = allreduce_costs(model, nodes, per_node, n)
        best = min(costs, key=costs.get)
        return best, costs[best], gather if stage == 1 else 0.0
    scatter = cost("reduce_scatter", p, n, link, g)
    return "ring", scatter, gather * (2 if stage == 3 else 1)


@dataclass
class Workload:
    """What one training step needs: measured or given."""

    parameters: int
    compute_s_per_sample: float
    batch_per_rank: float
    data_s_per_sample: float = 0.0
    # Step time the gradient reduction adds, per second of its standalone cost: 0 = hidden behind
    # backward, 1 = fully exposed, above 1 = it also slows compute (engine and backward share a core).
    exposure: float = 1.0
    backward_fraction: float = 2 / 3  # of compute: the time a reduction can hide behind
    # The optimizer update of one whole replica per step (not per sample; 0 = folded into compute).
    # Node-shared data parallel pays 1/q of it per rank, ZeRO 1/p; a replica per rank all of it.
    update_s: float = 0.0
    node_shared: bool = False  # stage 0 runs NodeSharedOptimizer (one copy per node)
    # Waiting for the slowest rank each step, as a fraction of compute at 2 ranks (run-to-run jitter of
    # compute); the expected maximum of p such jitters grows like sqrt(log2 p).
    skew: float = 0.0
    bucket_bytes: int = 25 << 20
    bytes_per_parameter: int = 4
    cores_per_node: int | None = None  # ranks beyond the cores share them (oversubscription)


def predict(model: Model, work: Workload, nodes: int, per_node: int, stage: int = 0) -> dict:
    """Predicted step time and its split for one node shape (batch_per_rank as given)."""
    p = nodes * per_node
    slow = max(1.0, per_node / work.cores_per_node) if work.cores_per_node else 1.0
    n = work.parameters * work.bytes_per_parameter
    buckets = max(1, math.ceil(n / work.bucket_bytes))
    algorithm, reduce_s, gather_s = zero_costs(model, nodes, per_node, n / buckets, stage, work.node_shared)
    reduce_s *= buckets * slow
    gather_s *= buckets * slow
    update_share = 1 / p if stage else (1 / per_node if algorithm == "node-shared" else 1.0)
    compute = (work.compute_s_per_sample * work.batch_per_rank + work.update_s * update_share) * slow
    data = work.data_s_per_sample * work.batch_per_rank
    prefetched = stage == 3  # stage 3 gathers run ahead of the layers; stages 1-2 gather after the step
    overlappable = reduce_s + (gather_s if prefetched else 0.0)
    hideable = work.backward_fraction * compute  # nothing hides behind more time than backward takes
    exposed = max(work.exposure * overlappable, overlappable - hideable) + (0.0 if prefetched else gather_s)
    exposed += work.skew * compute * math.sqrt(math.log2(p)) if p > 1 else 0.0
    step = compute + data + exposed
    return {"ranks": p, "nodes": nodes, "per_node": per_node, "stage": stage, "algorithm": algorithm,
            "comm_s": reduce_s + gather_s, "exposed_s": exposed, "compute_s": compute, "data_s": data,
            "step_s": step, "samples_per_s": p * work.batch_per_rank / step}


def best_algorithms(model: Model, nodes: int, per_node: int, sizes=(1 << 10, 1 << 20, 64 << 20)) -> dict:
    """The cheapest allreduce algorithm per message size: the regimes of this node shape."""
    out = {}
    for n in sizes:
        costs = allreduce_costs(model, nodes, per_node, n)
        out[n] = min(costs, key=costs.get)
    return out
