"""Recovery from losing a spot node: restart time, steps lost and total cost, on a local multi-node cluster.

One local cluster (a head and two worker raylets with ``spot: 1``, as in tests/integration/test_chaos.py)
runs three trainings of the tiny config with the same settings, one after the other:

  a. uninterrupted  the baseline: wall time, steady step time, checkpoint cost as a share of training time
  b. sigkill        the node of rank 1 SIGKILLed halfway between two checkpoints (no notice); the spot
                    fleet's replacement (``add_worker``) is started as soon as the node is gone
  c. notice         the same node drained with reason PREEMPTION and a deadline, SIGKILLed at the deadline,
                    then replaced; after the notice the loop checkpoints after every step

    python bench/recovery.py                  # 3000 steps, checkpoint_every 300
    python bench/recovery.py --quick          # 80 steps, checkpoint_every 20: a smoke run, not recorded
    python bench/recovery.py --deadline 20 --set train.checkpoint_every=20
    python bench/recovery.py --set failure.poll_interval_s=2   # the Train controller's poll at Ray's default
    python bench/recovery.py --s3-model 1024x22               # a ~1 GB base model fetched from S3, see below

With ``--s3-model HIDDENxLAYERS`` the base model is a random-weight Llama of that shape (fp32 safetensors,
the tiny model's tokenizer; bench/train_overhead.py's ``build_llama``) on an S3-compatible server (moto,
its own process on 127.0.0.1), trained as ``model.name_or_path: s3://...``. Every node of the local cluster has its own model cache (a real node's
disk), so the first run fetches the model on both worker nodes and each replacement node fetches it again
before it can resume: the recovery figures include that fetch. A plain copy of the same objects, timed in
the same run before the trainings, is the bandwidth baseline. Defaults then: 60 steps, a checkpoint every
20, micro-batch 2, global batch 4 (1024x22 steps in about 1.4 s on one core).

Why 3000 steps: on an idle 2-core machine the tiny model trains at ~24 ms a step, so the config's
own 120-300 steps are shorter than one recovery, and every ratio below would measure the run's
length instead of the fault's cost. 3000 steps with a checkpoint every 300 (about 7 s of training)
give a run of ~90 s in which a checkpoint interval is long against one save.

The tiny model is built into a private FTUNE_HOME under the work folder unless FTUNE_HOME is set (set it
to reuse a build between runs). Every run starts its own local cluster and never joins another Ray.

Goals: node killed -> first resumed step <= 30 s; <= 1 step lost with a notice; checkpoint saves <= 5 % of
training time; total wall time <= 1.2x the uninterrupted run. Where the recovery time goes comes from time
stamps of the Train controller (a callback) and of the workers (timers around the loop's start-up phases).
Results go to bench/RESULTS.md (section "Recovery").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))  # faults.py

from faults import Background, last_step
from ray.train.v2._internal.execution.callback import (
    ControllerCallback,
    ReportCallback,
    WorkerCallback,
    WorkerGroupCallback,
)

from bench.report import REPO, RESULTS, goal, machine_line, markdown_table, record_section
from tests.waiting import wait_for

TINY_CONFIG = REPO / "configs" / "train" / "tiny.yaml"
EVENTS_ENV = "FTUNE_BENCH_EVENTS"
# Spot workers as in the chaos tests; evaluation only at the end so checkpoint steps are only checkpoints.
ON_SPOT = [
    "scaling.resources_per_worker={spot: 1}",
    "failure.max_failures=3",
    "failure.max_preemption_failures=3",
    "train.eval_every=1000000",
    "train.exact_match_examples=0",
    "data.max_validation_rows=32",
    "tracking.wandb=disabled",
]
RECOVERY_GOAL_S, NOTICE_LOST_GOAL, CHECKPOINT_GOAL, WALL_GOAL = 30.0, 1, 0.05, 1.2
FETCH_BANDWIDTH_GOAL = 0.8
"""A replacement node's fetch of an s3:// base model, against a plain copy's bandwidth in the same run."""
S3_DEFAULTS = ["train.micro_batch_size=2", "train.global_batch_size=4"]
RUN_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------ time stamps
def _append(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class ControllerTimeline(ControllerCallback, WorkerGroupCallback, ReportCallback):
    """Time stamps of the Train controller: state changes, worker-group start-up, reports (runs on the head)."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = str(path), run

    def _emit(self, event: str, **fields) -> None:
        _append(self.path, {"t": time.time(), "event": event, "run": self.run, **fields})

    def after_controller_state_update(self, previous_state, current_state):
        if type(current_state) is not type(previous_state):  # RUNNING -> RUNNING every poll is noise
            self._emit("state", state=type(current_state).__name__)

    def before_worker_group_start(self, worker_group_context):
        self._emit("worker_group:start")

    def before_init_train_context(self, workers):
        self._emit("worker_group:actors_ready")  # placement group placed, worker actors created
        return {}

    def after_worker_group_start(self, worker_group):
        self._emit("worker_group:started")
        return super().after_worker_group_start(worker_group)

    def after_worker_group_training_start(self, worker_group):
        self._emit("training:started")

    def after_report(self, training_report, metrics):
        m = metrics[0] if metrics else {}
        self._emit(
            "report",
            step=m.get("step"),
            checkpoint=training_report.checkpoint is not None,
            checkpoint_save_s=m.get("checkpoint_save_s"),
            jit=m.get("jit_checkpoint"),
        )


class WorkerTimeline(WorkerCallback):
    """Time stamp on each worker once Ray Train's context is set up, before the process group (runs on workers)."""

    def __init__(self, run: str):
        self.run = run

    def after_init_train_context(self):
        row = {"t": time.time(), "event": "train_context_ready", "run": self.run, "rank": -1}
        try:
            import ray.train

            row["rank"] = ray.train.get_context().get_world_rank()
        except Exception as e:  # noqa: BLE001 - a time stamp must never fail a worker
            row["error"] = repr(e)
        _append(os.path.join(os.environ[EVENTS_ENV], f"worker-{os.getpid()}.jsonl"), row)


class EventPhases:
    """A ``train.phases.PhaseTimer`` that time-stamps a worker's start-up phases and checkpoints.

    Given to ``run_training`` (pickled by value to the workers). Each worker appends ``{"t", "event", ...}``
    rows to ``$FTUNE_BENCH_EVENTS/worker-<pid>.jsonl``: once per phase and per checkpoint, never per step.
    """

    TIMED = {"load_tokenizer", "build_engine", "load_base_model", "add_adapter", "deepspeed.initialize",
             "load_checkpoint", "checkpoint"}
    """The loop's phases recorded (train/phases.py); the per-step ones are left out."""

    def __init__(self, run: str):
        self.run = run
        self.base: dict[str, Any] = {}
        self.path = ""

    def emit(self, event: str, t: float | None = None, **fields) -> None:
        _append(self.path, {"t": t or time.time(), "event": event, **self.base, **fields})

    @contextlib.contextmanager
    def phase(self, name: str, **fields: Any):
        if name == "worker":
            self._start_worker()
            yield
            self.emit("loop_done")
            return
        if name not in self.TIMED:
            yield
            return
        fields = {k: v for k, v in fields.items() if k in ("step", "jit")}
        self.emit(f"{name}:start", **fields)
        try:
            yield
        finally:
            self.emit(f"{name}:end", **fields)

    def _timed(self, owner, attr: str, label: str) -> None:
        """Library calls have no phase of their own: wrap them in this worker process."""
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            self.emit(f"{label}:start")
            try:
                return inner(*args, **kwargs)
            finally:
                self.emit(f"{label}:end")

        setattr(owner, attr, wrapper)

    def _time_model_fetch(self) -> None:
        """Time each s3:// model fetch into this node's cache, with the bytes it added to the cache."""
        import ray

        import ftune.model_cache as model_cache

        inner = model_cache.fetch_model

        def cached_bytes() -> int:
            return sum(p.stat().st_size for p in model_cache.cache_root().rglob("*") if p.is_file())

        def fetch(*args, **kwargs):
            label = "fetch_model" if kwargs.get("weights", True) else "fetch_model.small"
            before = cached_bytes()
            self.emit(f"{label}:start")
            path = inner(*args, **kwargs)
            self.emit(f"{label}:end", fetched_bytes=cached_bytes() - before,
                      node_id=ray.get_runtime_context().get_node_id())
            return path

        model_cache.fetch_model = fetch

    def _start_worker(self) -> None:
        entered, preloaded = time.time(), [m for m in ("transformers", "peft", "deepspeed") if m in sys.modules]
        import deepspeed  # noqa: F401 - imported here, as the loop's engine would, to time the imports
        import psutil
        import ray
        import ray.train

        ctx = ray.train.get_context()
        self.path = os.path.join(os.environ[EVENTS_ENV], f"worker-{os.getpid()}.jsonl")
        self.base = {"run": self.run, "rank": ctx.get_world_rank()}
        get_notice = ray.train.get_preemption_info

        def notice_once():
            info = get_notice()
            if info is not None:
                self.emit("notice")
                ray.train.get_preemption_info = get_notice
            return info

        ray.train.get_preemption_info = notice_once
        # Ray Train internals: where a checkpoint's ray.train.report goes (skipped if an upgrade renames them).
        from ray.train.v2._internal.execution import context as train_context

        for attr, label in (
            ("_sync_checkpoint_dir_name_across_ranks", "report.barrier"),
            ("_upload_checkpoint", "report.upload"),
            ("_wait_then_report", "report.queue"),
        ):
            if hasattr(train_context.TrainContext, attr):
                self._timed(train_context.TrainContext, attr, label)
        self._time_model_fetch()
        self.emit("process_started", t=psutil.Process().create_time())
        self.emit("imports_done")
        self.emit(
            "loop_entered",
            t=entered,
            node_id=ray.get_runtime_context().get_node_id(),
            world=ctx.get_world_size(),
            imported=preloaded,
        )


def read_jsonl(paths) -> list[dict[str, Any]]:
    """Rows of every JSONL file in ``paths``, sorted by time stamp when they have one."""
    rows = [
        json.loads(line) for p in paths if p.exists() for line in p.read_text().splitlines() if line.strip()
    ]
    return sorted(rows, key=lambda r: r.get("t", 0.0))


# ---------------------------------------------------------------------------------------- runs
@dataclass
class Outcome:
    """One training run and what happened to it."""

    name: str
    wall_s: float
    """Driver: ``run_training`` called -> returned (start-up, training, restarts, adapter export)."""
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    """metrics.jsonl rows with a loss (one per step and attempt)."""
    events: list[dict[str, Any]]
    """Controller and worker time stamps of this run."""
    fault: dict[str, Any] = field(default_factory=dict)
    """What was done to the cluster and when (unix time stamps)."""


def job(storage: Path, steps: int, extra: list[str]):
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config

    return load_config(
        TrainJobConfig, TINY_CONFIG, [f"storage.path={storage}", *ON_SPOT, f"train.max_steps={steps}", *extra]
    )


def node_of_rank(events_dir: Path, run: str, rank: int) -> str:
    """Hex id of the node hosting ``rank`` in the run's latest worker group."""
    entered = [
        e
        for e in read_jsonl(events_dir.glob("worker-*.jsonl"))
        if e["run"] == run and e["event"] == "loop_entered"
    ]
    return [e for e in entered if e["rank"] == rank][-1]["node_id"]


def node_end_time(cluster, node_id: str) -> float | None:
    """When the GCS marked a node dead (unix s), or None while it is alive."""
    from cluster.gcs import gcs_client

    for nid, info in gcs_client(cluster.address).get_all_node_info(timeout=10).items():
        if nid.hex() == node_id and info.end_time_ms:
            return info.end_time_ms / 1000
    return None


def run(
    cluster, cfg, name: str, work: Path, fault: str | None = None, at_step: int = 0, deadline_s: float = 0.0
) -> Outcome:
    """Train ``name`` to the end; on the way ``fault`` (sigkill / notice) the node of rank 1 at ``at_step``."""
    from train.job import run_training

    events_dir, run_dir = work / "events", Path(cfg.storage.path) / name
    timeline = ControllerTimeline(events_dir / f"controller-{name}.jsonl", name)

    def train():
        start = time.time()
        summary = run_training(
            cfg, name=name, callbacks=[timeline, WorkerTimeline(name)], phase_timer=EventPhases(name)
        )
        return summary, time.time() - start

    print(
        f"[bench] {name}: {cfg.train.max_steps} steps" + (f", {fault} at step {at_step}" if fault else ""),
        flush=True,
    )
    background = Background(train)
    marks: dict[str, Any] = {}
    if fault:

        def finished() -> bool:
            return background.error is not None or background.result is not None

        wait_for(
            lambda: last_step(run_dir) >= at_step or finished(), f"step {at_step} of {name}", timeout_s=RUN_TIMEOUT_S
        )
        if finished():
            background.join(0)
            raise RuntimeError(f"{name} finished before step {at_step}; use more --steps")
        victim = node_of_rank(events_dir, name, rank=1)
        marks.update(victim=victim, step_at_fault=last_step(run_dir))
        if fault == "sigkill":
            marks["t_kill"] = time.time()
            cluster.kill_worker(victim)
            marks["kill_worker_s"] = time.time() - marks["t_kill"]
        else:
            marks["t_notice"] = time.time()
            cluster.drain_worker(victim, reason="PREEMPTION", deadline_s=deadline_s, kill_at_deadline=True)
            marks["t_kill"] = time.time() + deadline_s  # the cluster's timer SIGKILLs the node then
            time.sleep(max(0.0, marks["t_kill"] - time.time()))
            wait_for(lambda: not cluster.pids(victim), f"node {victim[:8]} to go at its deadline", timeout_s=60)
        marks["t_replacement_start"] = time.time()
        cluster.add_worker()  # the spot fleet replaces the node
        marks["t_replacement_up"] = time.time()
        marks["t_node_dead"] = node_end_time(cluster, victim)
    summary, wall = background.join(RUN_TIMEOUT_S)
    rows = [r for r in read_jsonl([run_dir / "metrics.jsonl"]) if "loss" in r]
    events = [e for e in read_jsonl(events_dir.glob("*.jsonl")) if e["run"] == name]
    print(f"[bench] {name}: {wall:.1f} s, {summary['restarts']} restart(s)", flush=True)
    return Outcome(name, wall, summary, rows, events, marks)


# ------------------------------------------------------------------------------------- analysis
def first_restart(rows: list[dict[str, Any]], after: float) -> tuple[dict, dict] | None:
    """(last row before, first row after) of the first restart after ``after``.

    The rows' restart count changes there; a resume that lost no step does not repeat one.
    """
    for prev, row in itertools.pairwise(rows):
        if row.get("restarts", 0) != prev.get("restarts", 0) and row["time"] > after:
            return prev, row
    return None


def intervals(o: Outcome, label: str, rank: int = 0) -> list[tuple[float, float]]:
    """(start, end) of every ``label`` timer of one rank, in order."""
    starts, out = [], []
    for e in o.events:
        if e.get("rank") == rank and e["event"] == f"{label}:start":
            starts.append(e["t"])
        elif e.get("rank") == rank and e["event"] == f"{label}:end" and starts:
            out.append((starts.pop(), e["t"]))
    return out


def checkpoint_parts(o: Outcome, jit: bool = False) -> dict[str, float]:
    """Seconds of rank 0's checkpoints (periodic, or just-in-time), summed, by part: ray.train.report's barrier
    (agree on the directory name), its upload to storage, its wait until the controller takes the report, and
    the rest (mostly ``save_checkpoint``)."""
    jit_at = {
        e["t"]: bool(e.get("jit")) for e in o.events if e["event"] == "checkpoint:start" and e["rank"] == 0
    }
    windows = [(a, b) for a, b in intervals(o, "checkpoint") if jit_at.get(a) == jit]
    parts = {"count": len(windows), "total": sum(b - a for a, b in windows)}
    for label in ("report.barrier", "report.upload", "report.queue"):
        spans = intervals(o, label)
        if spans:
            parts[label] = sum(e - s for s, e in spans for a, b in windows if a <= s and e <= b)
    parts["save"] = parts["total"] - sum(v for k, v in parts.items() if k.startswith("report."))
    return parts


def checkpoint_cost(o: Outcome) -> dict[str, float]:
    """Rank 0's checkpoint save time (``checkpoint_save_s``) and save + report time, and the training time."""
    saves = [r["checkpoint_save_s"] for r in o.rows if r.get("checkpoint_save_s") is not None]
    if not saves:  # the loop logs the row before checkpointing: the controller sees the value in the report
        saves = [
            e["checkpoint_save_s"]
            for e in o.events
            if e["event"] == "report" and e.get("checkpoint_save_s") is not None
        ]
    ends = {e["step"]: e["t"] for e in o.events if e["event"] == "checkpoint:end" and e["rank"] == 0}
    full = [
        ends[e["step"]] - e["t"]
        for e in o.events
        if e["event"] == "checkpoint:start" and e["rank"] == 0 and e["step"] in ends
    ]
    return {
        "count": len(saves),
        "save_s": sum(saves),
        "full_s": sum(full),
        "train_s": o.summary["wall_time_s"],
    }


MILESTONES = (
    ("drain requested (the notice)", "notice"),
    ("the loop sees the notice, checkpoints every step", "notice_seen"),
    ("node killed", "kill"),
    ("controller gives up the worker group (RestartingState)", "restart"),
    ("GCS marks the node dead (health checks)", "node_dead"),
    ("new worker group requests its placement group", "worker_group:start"),
    ("replacement node registered (add_worker returns)", "replacement"),
    ("worker processes forked (the raylet prestarts them)", "process_started"),
    ("placement group placed, worker actors up", "worker_group:actors_ready"),
    ("Ray Train context set up on the workers", "train_context_ready"),
    ("process group (gloo) up, worker group started", "worker_group:started"),
    ("train function launched", "training:started"),
    ("loop entered", "loop_entered"),
    ("train.loop and deepspeed imported", "imports_done"),
    ("data fetched from the object store", "load_tokenizer:start"),
    ("tokenizer loaded (first import of transformers)", "load_tokenizer:end"),
    ("s3:// base model in the node's cache (fetched or found)", "fetch_model:end"),
    ("base model loaded", "load_base_model:end"),
    ("LoRA adapter added (first import of peft)", "add_adapter:end"),
    ("deepspeed.initialize done", "deepspeed.initialize:end"),
    ("checkpoint loaded", "load_checkpoint:end"),
    ("first resumed step logged", "resumed"),
)
"""What happens between a kill and the first resumed step, in the order it usually happens."""


def milestones(o: Outcome) -> dict[str, float]:
    """Key of MILESTONES -> unix time; worker phases are the slowest rank's (the first step needs every rank)."""
    f, ev = o.fault, o.events
    t0 = f.get("t_notice", f["t_kill"])
    restart = next(
        (e["t"] for e in ev if e["event"] == "state" and e["state"] == "RestartingState" and e["t"] > t0),
        None,
    )
    after = restart or f["t_kill"]
    pair = first_restart(o.rows, f["t_kill"])
    found = {
        "notice": f.get("t_notice"),
        "notice_seen": next((e["t"] for e in ev if e["event"] == "notice" and e["rank"] == 0), None),
        "kill": f["t_kill"],
        "restart": restart,
        "node_dead": f.get("t_node_dead"),
        "replacement": f["t_replacement_up"],
        "resumed": pair[1]["time"] if pair else None,
    }
    for _, key in MILESTONES:
        if key in found:
            continue
        per_rank: dict[int, float] = {}
        for e in ev:
            if e["event"] == key and e["t"] > after:
                per_rank.setdefault(e.get("rank", 0), e["t"])
        found[key] = max(per_rank.values()) if per_rank else None
    return {k: t for k, t in found.items() if t is not None}


def timeline_table(faulted: list[Outcome]) -> str:
    """Seconds from the kill to each milestone, one column per faulted run."""
    marks = [milestones(o) for o in faulted]
    rows = []
    for label, key in MILESTONES:
        if any(key in m for m in marks):
            rows.append(
                [
                    label,
                    *(
                        f"{m[key] - o.fault['t_kill']:+.1f}" if key in m else "-"
                        for o, m in zip(faulted, marks)
                    ),
                ]
            )
    return markdown_table(["milestone", *(f"{o.name}: s from kill" for o in faulted)], rows)


def phase_durations(o: Outcome) -> dict[str, float]:
    """Seconds of the resumed attempt's phases on the slowest rank (start -> end of each timer)."""
    out = {}
    for label in (
        "load_tokenizer",
        "fetch_model",
        "load_base_model",
        "add_adapter",
        "deepspeed.initialize",
        "load_checkpoint",
    ):
        per_rank: dict[int, float] = {}
        starts = {}
        for e in o.events:
            if e["t"] > o.fault["t_kill"] and e["event"].startswith(label + ":"):
                if e["event"].endswith(":start"):
                    starts.setdefault(e["rank"], e["t"])
                elif e["rank"] in starts:
                    per_rank.setdefault(e["rank"], e["t"] - starts[e["rank"]])
        if per_rank:
            out[label] = max(per_rank.values())
    return out


def describe_parts(parts: dict[str, float]) -> str:
    """``8 checkpoints, 8.3 s = save 2.1 + barrier 0.1 + ...`` from :func:`checkpoint_parts`."""
    names = {
        "report.barrier": "barrier",
        "report.upload": "upload",
        "report.queue": "wait for the controller",
    }
    head = f"{parts['count']} checkpoints, {parts['total']:.1f} s"
    if not any(key in parts for key in names):  # no ray.train.report timers (Ray internals renamed)
        return head + " (save and ray.train.report)"
    return f"{head} = save {parts['save']:.1f}" + "".join(
        f" + {name} {parts[key]:.1f}" for key, name in names.items() if key in parts
    )


def estimated_extra(o: Outcome, steady_step_s: float) -> float:
    """Seconds a fault adds, from its parts: kill -> resumed step, steps redone, and the notice window's slowdown.

    Measured on the same run, so less sensitive than the wall ratio to the machine's load drifting between runs.
    """
    pair = first_restart(o.rows, o.fault["t_kill"])
    if pair is None:
        return float("nan")
    extra = pair[1]["time"] - o.fault["t_kill"] + (pair[0]["step"] - pair[1]["step"] + 1) * steady_step_s
    notice = next((e["t"] for e in o.events if e["event"] == "notice" and e["rank"] == 0), None)
    if notice is not None:
        steps = sum(1 for r in o.rows if notice <= r["time"] <= o.fault["t_kill"])
        extra += (o.fault["t_kill"] - notice) - steps * steady_step_s
    return extra


def notice_window(o: Outcome, steady_step_s: float) -> str:
    """Steps and just-in-time checkpoints between the notice reaching the loop and the kill."""
    notice = next((e["t"] for e in o.events if e["event"] == "notice" and e["rank"] == 0), None)
    if notice is None:
        return "the loop never saw the notice"
    window = o.fault["t_kill"] - notice
    steps = sum(1 for r in o.rows if notice <= r["time"] <= o.fault["t_kill"])
    written = [
        e["step"] for e in o.events if e["event"] == "checkpoint:end" and e["rank"] == 0 and e.get("jit")
    ]
    taken = [e["step"] for e in o.events if e["event"] == "report" and e.get("jit")]
    return (
        f"the notice reached the loop {notice - o.fault['t_notice']:.1f} s after the drain; in the {window:.1f} s "
        f"left it trained {steps} steps ({window / steady_step_s:.0f} at the steady step time). Just-in-time "
        f"checkpoints finished by rank 0: steps {', '.join(map(str, written)) or 'none'}; taken in by the "
        f"controller before the restart: up to step {max(taken, default='none')}; "
        f"{describe_parts(checkpoint_parts(o, jit=True))}"
    )


def report(base: Outcome, faulted: list[Outcome]) -> tuple[str, list[str], list[str]]:
    """Results table, the recovery timeline (table and notes) and goal verdicts."""
    cost = checkpoint_cost(base)
    steady = base.summary["steady_step_time_s"]
    headers = [
        "run",
        "wall s",
        "x uninterrupted",
        "x estimated",
        "steady step s",
        "checkpoints",
        "ckpt save % of train",
        "ckpt save+report % of train",
        "restarts",
        "fault at step",
        "steps lost",
        "kill -> resumed step s",
    ]
    rows = [
        [
            base.name,
            f"{base.wall_s:.1f}",
            "1.00",
            "1.00",
            f"{steady:.3f}",
            cost["count"],
            f"{cost['save_s'] / cost['train_s']:.1%}",
            f"{cost['full_s'] / cost['train_s']:.1%}",
            0,
            "-",
            "-",
            "-",
        ]
    ]
    notes = [
        (
            f"{base.name}: training (loop) time {cost['train_s']:.1f} s of {base.wall_s:.1f} s wall; "
            f"checkpoint_save_s sums to {cost['save_s']:.1f} s; rank 0: {describe_parts(checkpoint_parts(base))}"
        )
    ]
    verdicts = [
        goal(
            "checkpoint save (sum of checkpoint_save_s) / training time",
            f"{cost['save_s'] / cost['train_s']:.1%}",
            f"<= {CHECKPOINT_GOAL:.0%}",
            cost["save_s"] / cost["train_s"] <= CHECKPOINT_GOAL,
        ),
        goal(
            "checkpoint save + ray.train.report / training time",
            f"{cost['full_s'] / cost['train_s']:.1%}",
            f"<= {CHECKPOINT_GOAL:.0%}",
            cost["full_s"] / cost["train_s"] <= CHECKPOINT_GOAL,
        ),
    ]
    for o in faulted:
        pair = first_restart(o.rows, o.fault["t_kill"])
        lost = pair[0]["step"] - (pair[1]["step"] - 1) if pair else None
        recovery = pair[1]["time"] - o.fault["t_kill"] if pair else None
        ratio = o.wall_s / base.wall_s
        estimate = 1 + estimated_extra(o, steady) / base.wall_s
        rows.append(
            [
                o.name,
                f"{o.wall_s:.1f}",
                f"{ratio:.2f}",
                f"{estimate:.2f}",
                f"{o.summary['steady_step_time_s']:.3f}",
                "-",
                "-",
                "-",
                o.summary["restarts"],
                o.fault["step_at_fault"],
                lost if lost is not None else "?",
                f"{recovery:.1f}" if recovery is not None else "?",
            ]
        )
        phases = phase_durations(o)
        notes.append(
            f"{o.name}: replacement node start (add_worker) "
            f"{o.fault['t_replacement_up'] - o.fault['t_replacement_start']:.1f} s; resumed attempt, slowest rank: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
        )
        if "t_notice" in o.fault:
            notes.append(f"{o.name}: {notice_window(o, steady)}")
        verdicts.append(
            goal(
                f"{o.name}: node killed -> first resumed step",
                f"{recovery:.1f} s" if recovery else "never",
                f"<= {RECOVERY_GOAL_S:.0f} s",
                recovery is not None and recovery <= RECOVERY_GOAL_S,
            )
        )
        if "t_notice" in o.fault:
            verdicts.append(
                goal(
                    f"{o.name}: steps lost",
                    str(lost),
                    f"<= {NOTICE_LOST_GOAL}",
                    lost is not None and lost <= NOTICE_LOST_GOAL,
                )
            )
        verdicts.append(
            goal(
                f"{o.name}: total wall vs uninterrupted",
                f"{ratio:.2f}x",
                f"<= {WALL_GOAL}x",
                ratio <= WALL_GOAL,
            )
        )
        verdicts.append(
            goal(
                f"{o.name}: uninterrupted + the fault's parts (estimate)",
                f"{estimate:.2f}x",
                f"<= {WALL_GOAL}x",
                estimate <= WALL_GOAL,
            )
        )
    notes.append(
        "x estimated = (uninterrupted wall + kill -> resumed step + steps lost x steady step time + the notice "
        "window's lost steps) / uninterrupted wall: the cost of the fault measured inside its own run, so less "
        "sensitive than the wall ratio to the load changing between runs"
    )
    return markdown_table(headers, rows), [timeline_table(faulted), "", *(f"- {n}" for n in notes)], verdicts


def model_fetches(o: Outcome) -> list[dict[str, Any]]:
    """Every full s3:// model fetch of a run: rank, start, seconds and bytes added to the node's cache."""
    starts: dict[int, float] = {}
    out = []
    for e in o.events:
        if e["event"] == "fetch_model:start":
            starts[e["rank"]] = e["t"]
        elif e["event"] == "fetch_model:end" and e["rank"] in starts:
            t0 = starts.pop(e["rank"])
            out.append({"rank": e["rank"], "t": t0, "s": e["t"] - t0, "bytes": e["fetched_bytes"]})
    return out


def fetch_report(outcomes: list[Outcome], model_bytes: int, plain_s: float) -> tuple[list[str], list[str]]:
    """Notes and verdicts on the s3:// base model: each node's fetch against the plain copy's bandwidth."""
    plain_bw = model_bytes / plain_s
    notes = [f"base model: {model_bytes / 1e6:.0f} MB of safetensors in S3; plain copy (driver, before the "
             f"trainings): {plain_s:.1f} s = {plain_bw / 1e6:.0f} MB/s"]
    verdicts = []
    for o in outcomes:
        fetches = model_fetches(o)
        cold = [f for f in fetches if f["bytes"] >= 0.9 * model_bytes]
        warm = [f for f in fetches if f["bytes"] < 0.01 * model_bytes]
        parts = [f"rank {f['rank']} {f['s']:.1f} s = {f['bytes'] / f['s'] / 1e6:.0f} MB/s "
                 f"({f['bytes'] / f['s'] / plain_bw:.2f}x the plain copy)" for f in cold]
        notes.append(f"{o.name}: {len(cold)} node(s) fetched the model ({'; '.join(parts) or 'none'}), "
                     f"{len(warm)} found it in their node's cache" + (f" in {max(f['s'] for f in warm) * 1e3:.0f} ms"
                                                                     if warm else ""))
        after_fault = [f for f in cold if "t_kill" in o.fault and f["t"] > o.fault["t_kill"]]
        for f in after_fault:
            ratio = f["bytes"] / f["s"] / plain_bw
            verdicts.append(goal(f"{o.name}: replacement node's fetch / plain copy bandwidth", f"{ratio:.2f}x",
                                 f">= {FETCH_BANDWIDTH_GOAL}x", ratio >= FETCH_BANDWIDTH_GOAL))
        if "t_kill" in o.fault:
            verdicts.append(goal(f"{o.name}: nodes that fetched the model after the fault", str(len(after_fault)),
                                 "1 (the replacement only)", len(after_fault) == 1))
    return notes, verdicts


@contextlib.contextmanager
def s3_model(shape: str, work: Path, tokenizer_dir: Path):
    """A random-weight Llama of ``shape`` (HIDDENxLAYERS) on a local S3 server: (uri, endpoint, bytes, plain copy s)."""
    from bench.model_fetch import BUCKET, CREDENTIALS, PREFIX, plain_copy, start_server, timed, upload
    from bench.train_overhead import build_llama
    from ftune.storage import Storage

    local = build_llama(shape, work / "s3-model", tokenizer_dir)
    total = sum(p.stat().st_size for p in local.iterdir())
    server, endpoint = start_server()
    try:
        os.environ.update(CREDENTIALS)
        upload(local, endpoint)
        shutil.rmtree(local)
        uri = f"s3://{BUCKET}/{PREFIX}"
        plain_s = timed(lambda: plain_copy(Storage(uri, endpoint), work / "plain-copy"))
        shutil.rmtree(work / "plain-copy")
        print(f"[bench] base model: {total / 1e6:.0f} MB at {uri} ({endpoint}); plain copy {plain_s:.1f} s", flush=True)
        yield uri, endpoint, total, plain_s
    finally:
        server.kill()
        server.wait()


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 3000; 80 with --quick)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 80 steps, checkpoint_every 20, not recorded"
    )
    parser.add_argument(
        "--deadline", type=float, default=10.0, help="seconds from the drain to the kill (notice run)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="section.key=value", help="config override"
    )
    parser.add_argument(
        "--out", help="keep runs, time stamps and the built model here (default: a temporary folder, deleted)"
    )
    parser.add_argument(
        "--s3-model", metavar="HIDDENxLAYERS",
        help="train a random-weight Llama of this shape fetched from a local S3 server (1024x22: ~1 GB in fp32)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the workers' and controller's logs")
    parser.add_argument("--no-record", action="store_true", help="do not update bench/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import deepspeed
    import ray
    import torch
    from ray import cloudpickle

    from cluster.local import LocalCluster
    from ftune.builtin_assets import ensure_sample_dataset, ensure_tiny_model, ftune_home

    short = args.quick or args.s3_model
    steps = args.steps or (80 if args.quick else 60 if args.s3_model else 3000)
    extra = [f"train.checkpoint_every={20 if short else 300}", *(S3_DEFAULTS if args.s3_model else []), *args.set]
    work = Path(args.out or tempfile.mkdtemp(prefix="ftune-bench-recovery-")).resolve()
    (work / "events").mkdir(parents=True, exist_ok=True)
    command = "python bench/recovery.py " + " ".join(argv)
    machine = machine_line()
    # A private FTUNE_HOME unless one is set: concurrent tests that rebuild the shared tiny model
    # would otherwise rebuild it inside a timed run.
    os.environ.setdefault("FTUNE_HOME", str(work / "ftune_home"))
    tiny = ensure_tiny_model()
    ensure_sample_dataset()  # built before anything is timed
    if __name__ != "__main__":  # workers cannot import bench/: ship the timers by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_ADDRESS", None)  # never join another engineer's cluster
    env = {
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
        "FTUNE_HOME": str(ftune_home()),
        "WANDB_MODE": "offline",
        EVENTS_ENV: str(work / "events"),
    }
    fetch_notes: list[str] = []
    fetch_verdicts: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            model_desc = "Tiny config"
            if args.s3_model:
                from bench.model_fetch import CREDENTIALS

                uri, endpoint, model_bytes, plain_s = stack.enter_context(s3_model(args.s3_model, work, tiny))
                extra += [f"model.name_or_path={uri}", f"model.endpoint_url={endpoint}"]
                env.update(CREDENTIALS)
                model_desc = (f"Tiny config on a random-weight {args.s3_model} Llama ({model_bytes / 1e6:.0f} MB fp32 "
                              f"safetensors) fetched from S3 (moto on 127.0.0.1) into each node's own cache")
            cfg = job(work / "runs", steps, extra)
            every = cfg.train.checkpoint_every
            # Faults halfway between two checkpoints: the mean loss of a kill at a random moment.
            at_step = (steps // 2) // every * every + every // 2
            print(
                f"machine: {machine}\ncommand: {command}\n{steps} steps, checkpoint_every {every}, faults at step "
                f"{at_step}, notice deadline {args.deadline:.0f} s, work dir {work}",
                flush=True,
            )
            poll = f"{cfg.failure.poll_interval_s:g} s (failure.poll_interval_s)"
            cluster = stack.enter_context(LocalCluster(head_cpus=1, cpus_per_worker=1).up(2))
            ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=args.verbose)
            try:
                base = run(cluster, cfg, "uninterrupted", work)
                sigkill = run(cluster, cfg, "sigkill", work, "sigkill", at_step)
                notice = run(cluster, cfg, "notice", work, "notice", at_step, args.deadline)
            finally:
                ray.shutdown()
        outcomes = [base, sigkill, notice]
        (work / "outcomes.json").write_text(json.dumps([dataclasses.asdict(o) for o in outcomes]))
        table, timeline, verdicts = report(base, [sigkill, notice])
        if args.s3_model:
            fetch_notes, fetch_verdicts = fetch_report(outcomes, model_bytes, plain_s)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join(
        [
            f"## Recovery{' with the base model fetched from S3' if args.s3_model else ''} (`{command}`)\n",
            (
                f"{machine}; load avg after {load_after}; ray {ray.__version__}, deepspeed {deepspeed.__version__}, "
                f"torch {torch.__version__}. Local cluster: head (1 CPU) + 2 worker raylets (1 CPU, `spot: 1`), GCS "
                f"health check 1 s x 5, Train preemption poll 0.5 s, Train controller poll {poll}. {model_desc}, {steps} steps, checkpoint_every "
                f"{every}, evaluation only at the end; faults hit rank 1's node at step {at_step}; notice deadline "
                f"{args.deadline:.0f} s.\n"
            ),
            table,
            "\nWhere the recovery time went (seconds from the kill; worker phases are the slowest rank's):\n",
            *timeline,
            *(f"- {n}" for n in fetch_notes),
            "\n```",
            *verdicts,
            *fetch_verdicts,
            "```",
        ]
    )
    print("\n" + text)
    if not (args.quick or args.no_record):
        record_section("bench/recovery.py" + (" --s3-model" if args.s3_model else ""), text)
        print(f"\nrecorded in {RESULTS}")
    return 0 if all(v.startswith("PASS") for v in verdicts + fetch_verdicts) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
