"""Sweep driver: `python -m tune --config FILE [key=value ...]` / `ftune sweep`.

Runs a Ray Tune experiment in which every trial is a full distributed training job (tune/trial.py):
Optuna TPE with ASHA early stopping, random or grid baselines, or PBT whose exploits continue the
donor's Train checkpoint -- under a dollar / time / trial budget (tune/budget.py).

    python -m tune --config configs/sweep/tiny.yaml
    python -m tune --config configs/sweep/tiny.yaml --dry-run            # cost estimate, no trials
    ftune sweep --config configs/sweep/tiny.yaml search.algorithm=pbt budget.usd=0.02
    ftune sweep --resume ~/ftune_runs/sweeps/tiny-20260101-120000     # after the driver died
    ftune sweep --resume s3://bucket/runs/sweeps/tiny-20260101-120000  # on any machine (storage on S3)
    ray job submit --working-dir . -- python -m tune --config configs/sweep/tiny.yaml

The sweep directory, <job storage.path>/sweeps/<name>/:

    sweep.json            the sweep config and resolved training job (what --resume reads)
    spend.json            the ledger: per-trial cost, status, steps; spend over time; budget stop
    leaderboard.json/csv  one row per trial, best first (trial, config, eval_loss, cost, adapter_path)
    best/adapter/         the best trial's PEFT adapter (best/trial.json: its row)
    report.html           offline report: curves, loss vs cost (Pareto), spend vs budget, settings
    optuna.db             the Optuna study (SQLite; search.storage_url for a shared database)
    trials/<trial id>/    each trial's training run: checkpoints, metrics.jsonl, summary.json, adapter/
    trials/_baseline/     the untrained adapter's held-out metrics, measured once for all trials (train/baseline.py)
    pbt/<trial>-xNN/      PBT: the donor checkpoint an exploiting trial continued (pbt_exploits.jsonl)
    tune/                 Ray Tune's experiment state (Tuner.restore)

With storage.path on s3:// the driver works in FTUNE_HOME/sweeps/<name> and keeps its files (all but
trials/ and pbt/, which are in the bucket already) in the bucket too: pushed at trial checkpoints and
ends, pulled by --resume s3://... (tune/sweep_state.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.config import StorageConfig, TrainJobConfig
from ftune.entrypoint import prog
from ftune.errors import ConfigError, JobFailed, UserError
from ftune.interrupts import sigint_handler_restored
from ftune.storage import Storage
from ftune.sweep_result import TRIALS_DIR, SweepResult
from ftune.yaml_config import apply_overrides, load_config
from train.spec import RunData
from tune.budget import BudgetGate, BudgetStopper, SpendLedger, SpendTracker
from tune.config import SweepConfig
from tune.placement_groups import PlacementGroupRegistry
from tune.pricing import TrialShape, hourly_rate
from tune.space import SearchSpace, format_value, pbt_mutated
from tune.sweep_session import SweepSession
from tune.sweep_state import (
    SWEEP_FILE,
    SweepOptunaSearch,
    SweepState,
    SweepStateSync,
    SweepStudyStorage,
    pull_sweep,
)
from tune.trial import TrialPlan, trial_trainable

TUNE_DIR = "tune"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments of the sweep."""
    parser = argparse.ArgumentParser(prog=prog("python -m tune"),
                                     description="Budgeted LoRA hyperparameter sweeps on Ray Tune.")
    parser.add_argument("--config", type=Path, help="sweep YAML (e.g. configs/sweep/tiny.yaml)")
    parser.add_argument("--name", help="sweep name (same as name=...)")
    parser.add_argument("--resume", metavar="DIR", help="continue an interrupted sweep from its directory (or s3:// URI)")
    parser.add_argument("--dry-run", action="store_true", help="print the cost estimate and exit without trials")
    parser.add_argument("--show-trial-logs", action="store_true", help="stream every trial's worker output")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (on --resume: budget.* only)")
    return parser.parse_args(argv)


@dataclass
class Sweep:
    """A prepared sweep: config, directories, the plan every trial gets, the data and the prices."""

    cfg: SweepConfig
    """The validated sweep config."""
    name: str
    """Sweep name."""
    sweep_dir: Path
    """Driver-side directory (ledger, leaderboard, report, Tune state)."""
    storage: Storage
    """Shared root of trials/ and pbt/ (the same directory unless storage.path is s3://)."""
    plan: TrialPlan
    """What every trial gets."""
    data: RunData
    """The tokenized train/validation examples, prepared once."""
    shape: TrialShape
    """Resources of one trial."""
    rate_usd_per_h: float
    """Dollars per hour of one trial."""

    @property
    def uri(self) -> str:
        """Where the sweep lives in storage: the key its ledger, callbacks and scheduler find it by, on any machine."""
        return self.storage.uri_of()

    @property
    def state(self) -> SweepState:
        """The driver's files and their copy in storage."""
        return SweepState(self.sweep_dir, self.storage)

    @property
    def trials(self) -> Storage:
        """Where the trials' training runs live."""
        return self.storage.child(TRIALS_DIR)


def prepare_sweep(cfg: SweepConfig, name: str) -> Sweep:
    """Check and prepare everything before Ray starts: the job, the data (once), the plan, the price."""
    from ftune.builtin_assets import ftune_home
    from train.baseline import validation_digest
    from train.job import prepare

    job = cfg.job_config()
    root = Storage.from_config(job.storage)
    storage = root.child("sweeps", name)
    sweep_dir = ftune_home() / "sweeps" / name if root.is_remote else Path(storage.uri)
    data = job.model_dump(mode="json")
    trials = storage.child(TRIALS_DIR)
    data["storage"] = StorageConfig(path=trials.uri_of(), endpoint_url=trials.endpoint_url,
                                    region=trials.region).model_dump()
    data["tracking"]["group"] = name
    local_model = Path(job.model.name_or_path).expanduser()
    if not job.model.name_or_path.startswith("builtin:") and local_model.is_dir():
        data["model"]["name_or_path"] = str(local_model.resolve())  # trial workers run in other directories
    probe = TrainJobConfig.model_validate({**data, "name": "probe"})
    base, examples = prepare(probe, "probe")
    plan = TrialPlan(sweep_name=name, job=data, space=SearchSpace.from_config(cfg), base=base,
                     validation_digest=validation_digest(examples.validation))
    shape = TrialShape.of(job, cfg.compute.trial_driver_cpus)
    return Sweep(cfg, name, sweep_dir, storage, plan, examples, shape, hourly_rate(cfg.compute, shape))


@dataclass
class Estimate:
    """Projected cost of one full trial and what the budget buys."""

    step_time_s: float
    """Seconds per optimizer step used."""
    source: str
    """Where that step time comes from."""
    trial_s: float
    """Wall seconds of a full trial, start-up included."""
    trial_usd: float
    """Dollars of a full trial."""
    planned: int
    """Trials the search will ask for."""
    fits: int | None
    """Full trials the dollar budget pays for (None: no dollar budget)."""


def estimate(sweep: Sweep) -> Estimate:
    """Cost of a full trial from steps x step time (configured, measured in this sweep, or a 1 s guess)."""
    b = sweep.cfg.budget
    measured = [json.loads(p.read_text()).get("steady_step_time_s") for p in sweep.sweep_dir.glob(f"{TRIALS_DIR}/*/summary.json")]
    measured = [m for m in measured if m]
    if b.step_time_s is not None:
        step_s, source = b.step_time_s, "configured budget.step_time_s"
    elif measured:
        step_s, source = sum(measured) / len(measured), f"measured over {len(measured)} finished trial(s)"
    else:
        step_s, source = 1.0, "a GUESS: set budget.step_time_s"
    trial_s = b.startup_s + sweep.plan.total_steps * step_s
    trial_usd = sweep.rate_usd_per_h * trial_s / 3600.0
    planned = num_trials(sweep)
    if b.max_trials is not None:
        planned = min(planned, b.max_trials)
    fits = int(b.usd // trial_usd) if b.usd is not None and trial_usd > 0 else None
    return Estimate(step_s, source, trial_s, trial_usd, planned, fits)


def num_trials(sweep: Sweep) -> int:
    """Tune's num_samples: the grid's size for grid search, else search.num_samples."""
    s = sweep.cfg.search
    return sweep.plan.space.grid_size(s.grid_points) if s.algorithm == "grid" else s.num_samples


def print_estimate(sweep: Sweep, est: Estimate, concurrency: int | None) -> None:
    """The dry-run / start-of-sweep cost summary."""
    from tune.progress import say

    cfg, shape = sweep.cfg, sweep.shape
    gpus = f" x {shape.gpus_per_worker:g} GPU" if shape.gpus_per_worker else ""
    say(f"{sweep.name}: {cfg.search.algorithm} over {', '.join(d.key for d in sweep.plan.space.dims)}; "
        f"{est.planned} trial(s) planned; {sweep.plan.total_steps} steps each; dir {sweep.sweep_dir}")
    say(f"each trial: {shape.workers} worker(s) x {shape.cpus_per_worker:g} CPU{gpus} (+{shape.driver_cpus:g} CPU driver) "
        f"on {cfg.compute.instance_type} ({cfg.compute.market}) = ${sweep.rate_usd_per_h:.4f}/h")
    if cfg.search.algorithm == "grid":
        grid = sweep.plan.space.grid(cfg.search.grid_points)
        axes = " x ".join(f"{key} [{', '.join(format_value(v) for v in values)}]" for key, values in grid.items())
        say(f"grid: {axes} = {sweep.plan.space.grid_size(cfg.search.grid_points)} point(s)")
    say(f"estimated full trial: {sweep.plan.total_steps} steps x {est.step_time_s:.3g} s ({est.source}) + "
        f"{cfg.budget.startup_s:g} s start-up = {est.trial_s:.0f} s -> ${est.trial_usd:.5f}")
    if est.fits is not None:
        say(f"budget ${cfg.budget.usd:.4f}: {est.fits} full trial(s) fit"
            + (" (ASHA stops most trials early, so more can run)" if cfg.search.algorithm != "pbt" and cfg.search.asha.enabled else ""))
    if concurrency:
        waves = -(-min(est.planned, est.fits if est.fits is not None else est.planned) // concurrency)
        say(f"{concurrency} trial(s) at once -> about {waves * est.trial_s / 60:.1f} min at full length")


def make_searcher(sweep: Sweep, concurrency: int):
    """Optuna (TPE, random or grid sampler; study in SQLite) behind the budget gate and a concurrency limit.

    PBT takes no searcher (Tune forbids it): Tune samples the population from the param space and
    the PBT scheduler asks the budget before starting each member.
    """
    import optuna
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    s, space = sweep.cfg.search, sweep.plan.space
    if s.algorithm == "pbt":
        return BasicVariantGenerator(max_concurrent=concurrency, random_state=s.seed)
    if s.algorithm == "grid":
        sampler, dists = optuna.samplers.GridSampler(space.grid(s.grid_points), seed=s.seed), space.grid_distributions(s.grid_points)
    elif s.algorithm == "tpe":
        sampler, dists = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.tpe_startup_trials), space.optuna_distributions()
    else:
        sampler, dists = optuna.samplers.RandomSampler(seed=s.seed), space.optuna_distributions()
    storage = optuna.storages.RDBStorage(s.storage_url) if s.storage_url else SweepStudyStorage(sweep.uri, sweep.sweep_dir)
    searcher = SweepOptunaSearch(space=dists, metric=s.metric, mode=s.mode, sampler=sampler, study_name=sweep.name,
                                 storage=storage)
    return ConcurrencyLimiter(BudgetGate(searcher, sweep.uri), max_concurrent=concurrency)


def make_scheduler(sweep: Sweep, concurrency: int):
    """ASHA on steps (tpe/random/grid, unless disabled), PBT over Train checkpoints, or FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    from tune.schedulers import CheckpointPBT, FinalStepASHA

    s, job = sweep.cfg.search, TrainJobConfig.model_validate(sweep.plan.job)
    if s.algorithm == "pbt":
        mutate = pbt_mutated(sweep.cfg)
        return CheckpointPBT(
            sweep_uri=sweep.uri, storage=sweep.storage, total_steps=sweep.plan.total_steps,
            population_fits=s.num_samples <= concurrency, metric=s.metric, mode=s.mode,
            perturbation_interval=s.pbt.perturbation_interval_steps or job.train.checkpoint_every,
            burn_in_period=s.pbt.burn_in_steps, hyperparam_mutations=sweep.plan.space.pbt_mutations(mutate),
            quantile_fraction=s.pbt.quantile_fraction, resample_probability=s.pbt.resample_probability,
        )
    if s.asha.enabled:
        return FinalStepASHA(sweep_uri=sweep.uri, total_steps=sweep.plan.total_steps, metric=s.metric, mode=s.mode,
                             grace_period=s.asha.grace_period_steps or job.train.eval_every,
                             reduction_factor=s.asha.reduction_factor)
    return FIFOScheduler()


def trial_dirname(trial) -> str:
    """Tune's per-trial directory name under tune/: the trial id."""
    return trial.trial_id


def trainable(sweep: Sweep, registry: PlacementGroupRegistry, stop_signal: Any,
              ended: dict[str, dict[str, Any]] | None = None):
    """The trial trainable with the plan, data, stop signal (and on resume the ended trials) attached and the
    driver's CPUs reserved."""
    import ray.tune as ray_tune

    trial = trial_trainable(sweep.plan, sweep.data, registry.queue, stop_signal, ended)
    return ray_tune.with_resources(trial, {"CPU": sweep.shape.driver_cpus})


def concurrency_of(sweep: Sweep) -> int:
    """Trials at once: configured, else what the cluster's CPUs/GPUs fit with the trial's shape."""
    import ray

    s, cluster = sweep.cfg.search, ray.cluster_resources()
    fits = sweep.shape.concurrency(cluster)
    if fits < 1:
        raise UserError(f"one trial needs {sweep.shape.cpus:g} CPUs and {sweep.shape.gpus:g} GPUs but the cluster has "
                        f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs; lower scaling.num_workers "
                        "or compute.trial_driver_cpus, or add nodes")
    concurrency = s.max_concurrent_trials or fits
    if concurrency > fits:
        from tune.progress import say

        say(f"warning: search.max_concurrent_trials={concurrency} but the cluster's resources fit {fits} trial(s) at "
            "once; the others' workers wait for resources (an autoscaler may add nodes) while their time is counted")
    if s.algorithm == "pbt" and s.num_samples > concurrency:
        raise UserError(f"PBT population search.num_samples={s.num_samples} does not fit at once ({concurrency} trial(s) "
                        f"fit); lower it to {concurrency} or add resources (PBT would keep pausing and restarting runs)")
    return concurrency


def open_ledger(sweep: Sweep) -> SpendLedger:
    """The sweep's spend ledger (continued from spend.json on resume)."""
    est = estimate(sweep)
    ledger = SpendLedger.open(sweep.sweep_dir, sweep.cfg.budget, rate_usd_per_h=sweep.rate_usd_per_h,
                              estimate_trial_s=est.trial_s, report_interval_s=sweep.plan.job["train"]["report_interval_s"])
    if ledger.stop is not None and ledger.should_stop() is None:
        ledger.stop = None  # resumed with a larger budget
    return ledger


def run(sweep: Sweep, *, resume: bool, show_trial_logs: bool) -> dict[str, Any]:
    """Start (or restore) the Tune experiment, wait for it, and write the results."""
    import ray
    import ray.tune as ray_tune

    from ftune.console import (
        announce_ray_logs,
        ray_log_dir,
        ray_logging_level,
        show_only_ftune_lines,
        verbose_requested,
    )
    from train.stop import create_stop_signal
    from tune.progress import SweepProgress, say

    if not ray.is_initialized():
        ray.init(log_to_driver=show_trial_logs or verbose_requested(), logging_level=ray_logging_level())
        announce_ray_logs(show_only_ftune_lines(verbose=show_trial_logs) or ray_log_dir())
    if not verbose_requested():
        # Tune's own tables and banners (its "new output" prints an experiment box even at verbose=0)
        # and Optuna's per-study INFO lines: the sweep prints its own progress lines instead.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state fresh enough for --resume
    concurrency = concurrency_of(sweep)
    print_estimate(sweep, estimate(sweep), concurrency)
    ledger = open_ledger(sweep)
    registry = PlacementGroupRegistry.open(sweep.uri)
    stop_signal = create_stop_signal()  # raised by BudgetStopper; every trial's training run polls it
    session = SweepSession.begin(sweep.uri, ledger, placement_groups=registry, stop_signal=stop_signal)
    if resume:
        say(f"resuming {sweep.name}: ${ledger.spend():.4f} spent so far over {len(ledger.trials)} trial(s)")
        ended = ledger.recorded_ends(sweep.cfg.search.metric)  # Tune may run them again: they report and end
        tuner = ray_tune.Tuner.restore(str(sweep.sweep_dir / TUNE_DIR), resume_unfinished=True,
                                       trainable=trainable(sweep, registry, stop_signal, ended))
    else:
        s, metric = sweep.cfg.search, sweep.cfg.search.metric
        tuner = ray_tune.Tuner(
            trainable(sweep, registry, stop_signal),
            param_space=sweep.plan.space.tune_space() if s.algorithm == "pbt" else None,
            tune_config=ray_tune.TuneConfig(search_alg=make_searcher(sweep, concurrency), scheduler=make_scheduler(sweep, concurrency),
                                        num_samples=num_trials(sweep), trial_dirname_creator=trial_dirname,
                                        reuse_actors=s.reuse_trial_processes),
            run_config=ray_tune.RunConfig(
                name=TUNE_DIR, storage_path=str(sweep.sweep_dir), verbose=0, stop=BudgetStopper(sweep.uri),
                callbacks=[SpendTracker(sweep.uri, metric), registry,
                           SweepProgress(sweep.uri, sweep.plan.space, sweep.plan.base_r, metric, s.mode),
                           *([SweepStateSync(sweep.uri, sweep.storage)] if sweep.storage.is_remote else [])],
                failure_config=ray_tune.FailureConfig(max_failures=0),  # Ray Train retries inside the trial
            ),
        )
    try:
        with sigint_handler_restored():
            tuner.fit()
    finally:
        session.end()  # trials killed at the end of the sweep leave their runs' placement groups behind
        ray.kill(stop_signal)
    return finish(sweep, ledger)


def finish(sweep: Sweep, ledger: SpendLedger) -> dict[str, Any]:
    """Write the leaderboard, the best adapter and the report; print the outcome."""
    from tune.leaderboard import export_best, leaderboard, write_leaderboard
    from tune.progress import say
    from tune.report import write_report

    s, result = sweep.cfg.search, SweepResult(sweep.sweep_dir, sweep.storage)
    ledger.save()
    spend = ledger.to_json()
    rows = leaderboard(spend, result.trials, sweep.plan.space, sweep.plan.base_r, s.metric, s.mode)
    write_leaderboard(result, rows)
    best = export_best(result, rows)
    report = write_report(result, rows, spend,
                          {"name": sweep.name, "algorithm": s.algorithm, "metric": s.metric, "mode": s.mode})
    budget = f" of ${spend['budget_usd']:.4f}" if spend["budget_usd"] else ""
    say(f"done: {len(rows)} trial(s), spent ${spend['spent_usd']:.4f}{budget}"
        + (f" ({spend['stop']['reason']})" if spend["stop"] else ""))
    if best:
        say(f"best: #{best['number']} {best['trial']} eval loss {best['eval_loss']:.4f} -> {result.best_adapter}")
    say(f"report: {report}")
    if sweep.storage.is_remote:
        sweep.state.push()
        say(f"sweep state kept in {sweep.uri} (resume anywhere with --resume {sweep.uri})")
    if rows and all(r["status"] == "error" for r in rows):
        raise JobFailed(f"every trial failed; first error: {rows[0]['error']} (see {sweep.sweep_dir / TUNE_DIR})")
    return {"sweep_dir": str(sweep.sweep_dir), "spent_usd": spend["spent_usd"], "best": best, "rows": rows, "stop": spend["stop"]}


def start(cfg: SweepConfig, name: str, *, dry_run: bool = False, show_trial_logs: bool = False) -> dict[str, Any] | None:
    """A new sweep (or its dry run, which starts no trials)."""
    sweep = prepare_sweep(cfg, name)
    if dry_run:
        from tune.progress import say

        print_estimate(sweep, estimate(sweep), cfg.search.max_concurrent_trials)
        say("dry run: no trials started")
        return None
    if (sweep.sweep_dir / TUNE_DIR).exists() or (sweep.storage.is_remote and sweep.storage.exists(SWEEP_FILE)):
        where = sweep.uri if sweep.storage.is_remote else sweep.sweep_dir
        raise UserError(f"sweep {where} already exists; continue it with `ftune sweep --resume {where}` or pick "
                        "another name (name=...)")
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.model_dump(mode="json")
    config["compute"]["pricing"] = str(Path(cfg.compute.pricing).resolve())  # --resume may run elsewhere
    saved = {"name": name, "created": time.time(), "config": config, "job": cfg.job_config().model_dump(mode="json"),
             "pricing_as_given": cfg.compute.pricing}
    (sweep.sweep_dir / SWEEP_FILE).write_text(json.dumps(saved, indent=2))
    if sweep.storage.is_remote:
        sweep.state.push()
    return run(sweep, resume=False, show_trial_logs=show_trial_logs)


def resume(location: str | Path, overrides: list[str], *, show_trial_logs: bool = False) -> dict[str, Any]:
    """Continue an interrupted sweep: finished trials stay finished, spend carries on from spend.json.

    Args:
        location: The sweep's directory, or for a sweep on S3 its URI (``s3://.../sweeps/<name>``): then its
            state is fetched from the bucket, so the sweep continues on any machine.
    """
    remote = str(location).startswith("s3://")
    sweep_dir = pull_sweep(str(location)) if remote else Path(location).expanduser().resolve()
    if not (sweep_dir / SWEEP_FILE).is_file() or not (sweep_dir / TUNE_DIR).is_dir():
        raise UserError(f"--resume {location}: not a sweep directory (no {SWEEP_FILE} and {TUNE_DIR}/ there)")
    bad = [o for o in overrides if not o.startswith("budget.")]
    if bad:
        raise ConfigError(f"--resume only takes budget.* overrides (the space and job are fixed), got {' '.join(bad)}")
    saved = json.loads((sweep_dir / SWEEP_FILE).read_text())
    data = {**saved["config"], "base": None, "job": saved["job"]}
    given = saved.get("pricing_as_given")
    if not Path(data["compute"]["pricing"]).is_file() and given and Path(given).is_file():
        data["compute"]["pricing"] = given  # another machine: the table where the sweep was started from
    apply_overrides(data, overrides)
    cfg = load_config(SweepConfig, None, [], base=data)
    sweep = prepare_sweep(cfg, saved["name"])
    if (sweep.storage.uri_of() != Storage(str(location)).uri_of()) if remote else (sweep.sweep_dir != sweep_dir):
        raise UserError(f"--resume {location}: its sweep.json places the sweep at "
                        f"{sweep.storage.uri_of() if remote else sweep.sweep_dir}; resume it there")
    return run(sweep, resume=True, show_trial_logs=show_trial_logs)


def main(argv: list[str]) -> int:
    """Entry point of `python -m tune` and `ftune sweep`."""
    args = parse_args(argv)
    if args.resume:
        resume(args.resume, args.overrides, show_trial_logs=args.show_trial_logs)
        return 0
    if args.config is None:
        raise UserError("pass --config FILE (e.g. configs/sweep/tiny.yaml) or --resume DIR")
    cfg = load_config(SweepConfig, args.config, args.overrides)
    name = args.name or cfg.name or f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    start(cfg, name, dry_run=args.dry_run, show_trial_logs=args.show_trial_logs)
    return 0
