"""Sweeps end to end on a local Ray (CPU): every trial is a full Ray Train run of the tiny job.

TPE + ASHA prunes; PBT's exploit continues the donor's checkpoint with perturbed settings; the
budget stop holds (on a grid search); --dry-run prints a grid's size and per-trial cost and starts
nothing; a random search on S3 (a moto server on 127.0.0.1) whose driver is killed with one trial done and
one mid-run resumes from the bucket alone, on "another machine", without re-running finished trials or
losing spend.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from ray.util.queue import Empty

from ftune.yaml_config import load_config
from tests.waiting import wait_for
from tune.config import SweepConfig
from tune.sweep import main, start
from tune.sweep_state import LOST_WITH_DRIVER

# Each test runs a few full training runs; on a shared 2-core machine a sweep can take many minutes.
pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
TINY_SWEEP = REPO / "configs" / "sweep" / "tiny.yaml"
BUCKET = "ftune-sweeps"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ftune-test", "AWS_SECRET_ACCESS_KEY": "ftune-test", "AWS_DEFAULT_REGION": "us-east-1"}


def small(tmp: Path, *overrides: str) -> list[str]:
    """Overrides that make configs/sweep/tiny.yaml a test-sized sweep under ``tmp``."""
    return [
        f"job.storage.path={tmp}",
        "job.train.max_steps=20",
        "job.train.eval_every=5",
        "job.train.checkpoint_every=5",
        "job.train.report_interval_s=0.5",
        "job.data.max_validation_rows=32",
        "job.tracking.wandb=offline",  # test_report_is_offline_and_trials_tracked_in_wandb_group; others turn it off
        "search.max_concurrent_trials=2",
        "budget.usd=null",
        "budget.step_time_s=0.05",
        "budget.startup_s=20",
        *overrides,
    ]


def run_sweep(tmp: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    cfg = load_config(SweepConfig, TINY_SWEEP, small(tmp, *overrides))
    result = start(cfg, name)
    return result, Path(result["sweep_dir"])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def held_cpus() -> float:
    """CPUs reserved on the local Ray (trial drivers, Train workers' placement groups)."""
    import ray

    return ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)


def wait_until_released(what: str = "every CPU to be released (the trials' actors and placement groups gone)") -> None:
    """Wait until no CPU of the local Ray is held; fail naming ``what`` and the CPUs still held."""
    try:
        wait_for(lambda: held_cpus() == 0, what, 60, interval_s=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; {held_cpus()} CPU(s) still held") from None


@pytest.fixture(scope="module", autouse=True)
def _s3_credentials():
    # Set before the module's Ray starts, so its workers (the trials' Train workers) inherit them.
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        yield


@pytest.fixture
def s3():
    """(endpoint, boto3 client) of an S3-compatible server (moto) on 127.0.0.1 with an empty bucket."""
    import boto3

    from tests.s3_server import start_s3_server

    server, endpoint = start_s3_server()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    try:
        yield endpoint, client
    finally:
        server.shutdown()


def read_bucket(client, key: str) -> bytes:
    """An object of the bucket, whole."""
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def bucket_json(client, key: str):
    """A JSON object of the bucket, or None while there is none."""
    try:
        return json.loads(read_bucket(client, key))
    except client.exceptions.NoSuchKey:
        return None


@pytest.fixture(scope="module", autouse=True)
def _repo_cwd():
    # base: and compute.pricing are relative to the working directory (the repository root).
    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)


@pytest.fixture(scope="module")
def tpe_sweep(ray_local, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tpe")
    SIGINT_AROUND_SWEEP["before"] = signal.getsignal(signal.SIGINT)
    swept = run_sweep(tmp, "tpe", "search.num_samples=4", "search.tpe_startup_trials=3", "search.asha.reduction_factor=2",
                      "space.train.lr={loguniform: [1.0e-5, 1.0e-2]}")
    SIGINT_AROUND_SWEEP["after"] = signal.getsignal(signal.SIGINT)
    return swept


SIGINT_AROUND_SWEEP: dict[str, object] = {}
"""This process's SIGINT handler before and after the shared sweep (Ray Tune installs its own for a run)."""


def test_ctrl_c_is_the_process_own_again_after_the_sweep(tpe_sweep):
    assert SIGINT_AROUND_SWEEP["after"] is SIGINT_AROUND_SWEEP["before"]


def test_tpe_asha_completes_and_prunes(tpe_sweep):
    result, sweep_dir = tpe_sweep
    rows = json.loads((sweep_dir / "leaderboard.json").read_text())
    statuses = [r["status"] for r in rows]
    assert len(rows) == 4 and set(statuses) <= {"completed", "pruned"}, statuses
    assert "pruned" in statuses and "completed" in statuses, statuses
    for row in rows:
        assert {"trial", "config", "eval_loss", "steps", "cost_usd", "status", "pruned_at", "adapter_path"} <= row.keys()
        assert row["cost_usd"] > 0 and Path(row["adapter_path"], "adapter_config.json").is_file()
        if row["status"] == "pruned":
            assert row["pruned_at"] == row["steps"] < 20 and row["pruned_at"] % 5 == 0
            saved_at = int(row["adapter_path"].split("checkpoint_step")[1][:7])  # the checkpoint the sweep saw
            assert saved_at <= row["pruned_at"]
        else:
            assert row["steps"] == 20 and row["adapter_path"].endswith(f"trials/{row['trial']}/adapter")
    losses = [r["eval_loss"] for r in rows]
    assert losses == sorted(losses)
    # Trial processes are reused (a next trial skips a process start): 4 trials, 2 at a time, fewer processes.
    results = [sweep_dir / "tune" / r["trial"] / "result.json" for r in rows]
    pids = {json.loads(path.read_text().splitlines()[0])["pid"] for path in results}
    assert len(pids) < 4, pids
    best = sweep_dir / "best" / "adapter"
    assert (best / "adapter_model.safetensors").read_bytes() == Path(rows[0]["adapter_path"], "adapter_model.safetensors").read_bytes()
    assert rows[0]["status"] == "completed"
    # Each trial's config reached its training run: alpha = 2 x r, the sampled peak learning rate.
    for row in rows:
        peak = max(r["lr"] for r in read_jsonl(sweep_dir / "trials" / row["trial"] / "metrics.jsonl") if "lr" in r)
        assert peak == pytest.approx(row["config"]["train.lr"], rel=1e-6)
        assert row["config"]["lora.alpha"] == 2 * row["config"]["lora.r"]


def test_trials_share_one_evaluation_before_training(tpe_sweep):
    """Every trial's untrained adapter is the base model, so the first trials evaluate it and later ones take
    their numbers (train/baseline.py): all trials' step 0 is the same, measured by the first wave only."""
    _, sweep_dir = tpe_sweep
    trials = [r["trial"] for r in json.loads((sweep_dir / "leaderboard.json").read_text())]
    step0 = {t: next(r for r in read_jsonl(sweep_dir / "trials" / t / "metrics.jsonl") if r["step"] == 0) for t in trials}
    measured = sorted(t for t, row in step0.items() if "baseline_from" not in row)
    shared = sorted(t for t, row in step0.items() if "baseline_from" in row)
    assert 1 <= len(measured) <= 2 and shared, (measured, shared)  # 2 trials at once: at most those two measure
    assert {step0[t]["baseline_from"] for t in shared} <= set(measured)
    # Trials of other ranks and learning rates measured exactly the same numbers with their own engines.
    assert len({json.dumps({k: v for k, v in row.items() if k.startswith("eval_")}) for row in step0.values()}) == 1
    files = list((sweep_dir / "trials" / "_baseline").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["run"] in measured


def test_spend_ledger_matches_trials_and_optuna_study(tpe_sweep):
    import optuna

    _, sweep_dir = tpe_sweep
    spend = json.loads((sweep_dir / "spend.json").read_text())
    assert spend["spent_usd"] == pytest.approx(sum(t["cost_usd"] for t in spend["trials"]))
    for t in spend["trials"]:  # cost = $0.048/h x wall time
        assert t["cost_usd"] == pytest.approx(0.048 * t["wall_s"] / 3600)
    study = optuna.load_study(study_name="tpe", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.trials) == 4 and all(t.value is not None for t in study.trials)


def test_report_is_offline_and_trials_tracked_in_wandb_group(tpe_sweep):
    _, sweep_dir = tpe_sweep
    html = (sweep_dir / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 4
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for title in ("Eval-loss curves", "Eval loss vs cost", "Spend over time", "Settings vs objective"):
        assert title in html
    rows = json.loads((sweep_dir / "leaderboard.json").read_text())
    for row in rows:
        runs = list((sweep_dir / "trials" / row["trial"] / "wandb").glob(f"offline-run-*-{row['trial']}"))
        assert len(runs) == 1, row["trial"]
        if row["status"] == "completed":  # a pruned trial's run is killed before wandb flushes it
            assert b"tpe" in next(runs[0].glob("*.wandb")).read_bytes()  # the sweep name is the wandb group
    wait_until_released()


def test_pbt_exploit_continues_donor_checkpoint(ray_local, tiny_model_dir, tmp_path):
    # Checkpoints and evaluations on the perturbation interval. A step of 8 micro-batches keeps each trial
    # training long enough to overlap the other's (a trial that finishes all its steps before the other
    # reports anything leaves PBT nobody to compare it with).
    result, sweep_dir = run_sweep(
        tmp_path, "pbt", "search.algorithm=pbt", "search.num_samples=2", "search.seed=3", "job.train.max_steps=40",
        "job.tracking.wandb=disabled",
        "job.train.checkpoint_every=10", "job.train.eval_every=10", "job.train.global_batch_size=64",
        "search.pbt.perturbation_interval_steps=10", "search.pbt.quantile_fraction=0.5", "search.pbt.resample_probability=0",
        "space.lora.r={choice: [8]}", "space.lora.alpha={choice: [1.0, 64.0]}", "space.train.lr={loguniform: [2.0e-3, 4.0e-3]}",
    )
    exploits = read_jsonl(sweep_dir / "pbt_exploits.jsonl")
    assert exploits, "no exploit happened"
    first = exploits[0]
    assert first["trial"] != first["donor"] and first["donor_step"] in (10, 20, 30)
    # The exploiting trial's new run starts right after the donor's checkpoint step ...
    new_run = read_jsonl(sweep_dir / "trials" / first["run"] / "metrics.jsonl")
    assert new_run[0]["step"] == first["donor_step"] + 1
    copied = json.loads((sweep_dir / "pbt" / first["run"] / "checkpoint" / "train_state.json").read_text())
    assert copied["train_state"]["step"] == first["donor_step"]
    # ... from the donor's weights (its eval loss at that step), with a perturbed learning rate.
    donor_evals = {r["step"]: r["eval_loss"] for r in read_jsonl(sweep_dir / "trials" / first["donor_run"] / "metrics.jsonl")
                   if "eval_perplexity" in r}
    assert copied["train_state"]["last_eval"]["eval_loss"] == pytest.approx(donor_evals[first["donor_step"]])
    donor_lr, new_lr = first["donor_config"]["train.lr"], first["config_after"]["train.lr"]
    assert new_lr == pytest.approx(donor_lr * 0.8) or new_lr == pytest.approx(donor_lr * 1.2)
    assert first["config_after"]["lora.alpha"] in (1.0, 64.0)
    donor_rows = {r["step"]: r for r in read_jsonl(sweep_dir / "trials" / first["donor_run"] / "metrics.jsonl")}
    step = first["donor_step"] + 1
    if step in donor_rows and donor_rows[step]["lr"] > 0:  # same schedule position, new peak learning rate
        assert new_run[0]["lr"] / donor_rows[step]["lr"] == pytest.approx(new_lr / donor_lr, rel=1e-6)
    spend = json.loads((sweep_dir / "spend.json").read_text())
    exploited = next(t for t in spend["trials"] if t["trial_id"] == first["trial"])
    assert first["run"] in exploited["runs"] and exploited["status"] == "completed" and exploited["step"] == 40
    summary = json.loads((sweep_dir / "trials" / exploited["run"] / "summary.json").read_text())
    assert summary["steps"] == 40
    wait_until_released()


def test_budget_stop_holds(ray_local, tiny_model_dir, tmp_path):
    # A grid search (the 2 x 2 grid of rank x learning-rate range ends, 4 trials) of which only two start:
    # $0.0021 is about 79 s of each of the two trials running at once, less than either needs for 2000
    # steps; the projected cost (1 s per trial) lets both start, so the budget must stop them. The stop
    # comes 40 s (the grace period) + one report interval early, at about 39 s, often before a trial on a
    # busy machine has trained at all; each trial checkpoints and finishes within the grace period (it is
    # long so that a trial still starting up also gets to its first step and checkpoints there).
    budget = 0.0021
    _, sweep_dir = run_sweep(
        tmp_path, "budget", "search.algorithm=grid", "space.lora.r={choice: [4, 8]}", "search.grid_points=2",
        "search.asha.enabled=false", "job.tracking.wandb=disabled",
        "job.train.max_steps=2000", "job.train.eval_every=50", "job.train.checkpoint_every=50",
        f"budget.usd={budget}", "budget.step_time_s=0.0001", "budget.startup_s=1", "budget.stop_grace_s=40",
    )
    spend = json.loads((sweep_dir / "spend.json").read_text())
    stop = spend["stop"]
    assert stop is not None and stop["reason"].startswith("budget reached")
    assert budget - stop["interval_cost_usd"] - stop["grace_cost_usd"] <= stop["spend_usd"] <= spend["spent_usd"]
    assert spend["spent_usd"] <= budget + stop["interval_cost_usd"], (spend, stop)
    assert stop["killed_trials"] == [], "a trial did not finish within the grace period"
    rows = json.loads((sweep_dir / "leaderboard.json").read_text())
    assert all(r["status"] == "stopped_budget" for r in rows) and len(rows) == 2  # no third trial started
    points = {(r["config"]["lora.r"], r["config"]["train.lr"]) for r in rows}
    assert len(points) == 2 and points <= {(r, lr) for r in (4, 8) for lr in (3e-4, 1e-2)}, points  # grid points
    for row in rows:
        # Stopped where it was, not at its last periodic checkpoint: the checkpoint is at the last step it
        # trained, and the run ended normally, exporting that state as its adapter.
        run_dir = sweep_dir / "trials" / row["trial"]
        last_step = max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl"))
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stop_reason"] == stop["reason"] and summary["steps"] == last_step == row["steps"] < 2000
        checkpoint = run_dir / f"checkpoint_step{last_step:07d}"
        state = json.loads((checkpoint / "train_state.json").read_text())["train_state"]
        assert state["step"] == last_step, state
        assert Path(row["adapter_path"]).resolve() == (run_dir / "adapter").resolve()
        assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == (
            checkpoint / "adapter" / "adapter_model.safetensors").read_bytes()
    wait_until_released("the budget-stopped trials' actors and placement groups to be released")


def test_the_driver_aborts_a_stopped_trials_run_itself(ray_local, tiny_model_dir, tmp_path):
    """Tune may keep a stopped trial's actor for a later trial without calling it (reuse_actors): the sweep driver
    aborts the trial's Train run itself, at once, and the trial's process takes the run's failure for that abort.

    The abort comes after a random number of steps of a run that checkpoints every other step, so it may land
    mid-checkpoint or mid-report (``FTUNE_CHAOS_SEED=<seed>`` repeats a run)."""
    seed = int(os.environ.get("FTUNE_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    abort_after = random.Random(seed).randint(2, 9)
    print(f"FTUNE_CHAOS_SEED={seed}: the driver aborts the run after {abort_after} step rows")
    from ftune.config import TrainJobConfig
    from train.job import build_trainer, prepare
    from tune.placement_groups import PlacementGroupRegistry, RunHandoff, end_run, start_run

    cfg = load_config(TrainJobConfig, REPO / "configs" / "train" / "tiny.yaml", [
        f"storage.path={tmp_path}", "scaling.num_workers=1", "train.max_steps=100000", "train.eval_every=100000",
        "train.checkpoint_every=2", "train.exact_match_examples=0", "data.max_validation_rows=8",
        "train.report_interval_s=0.5", "tracking.wandb=disabled"])
    spec, data = prepare(cfg, "pruned")
    registry = PlacementGroupRegistry.open(str(tmp_path))
    run = start_run("pruned-trial")
    assert run is not None
    trainer = build_trainer(cfg, spec, data, [RunHandoff("pruned-trial", run.mailbox, registry.queue)])
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - the abort's failure is what this test looks at
            failure.append(e)
        finally:
            end_run("pruned-trial")

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    metrics = tmp_path / "pruned" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.is_file() and len(read_jsonl(metrics)) >= abort_after, "the run to train a few steps", 240)
        assert held_cpus() >= 1  # its worker's placement group
        registry.stop_runs(["pruned-trial"])  # what Tune's on_trial_complete (or a PBT pause) does on the driver
        thread.join(timeout=60)
        assert not thread.is_alive(), "trainer.fit() still running 60 s after the driver aborted its run"
        assert failure and run.aborted_by_sweep(), failure  # a failure the trial reads as the sweep's abort
        rows = len(read_jsonl(metrics))
        wait_until_released("the aborted run's worker and placement group to be gone")
        time.sleep(2)
        assert len(read_jsonl(metrics)) == rows  # nothing trains on
        assert registry.runs == {} and registry.groups == {}
        # The trial process's next run posts through the same queue; what is left there of this run is not its.
        following = start_run("next-trial")
        assert following is not None and following.mailbox.queue is run.mailbox.queue
        run.mailbox.post("left over")
        following.mailbox.post("for the next run")
        assert following.mailbox.take(timeout=10) == "for the next run"
        with pytest.raises(Empty):
            following.mailbox.take()
        end_run("next-trial")
    finally:
        registry.close()


def test_dry_run_starts_nothing(ray_local, tiny_model_dir, tmp_path, capsys):
    wait_until_released()
    overrides = small(tmp_path, "budget.usd=0.01", "search.algorithm=grid", "search.grid_points=2")
    assert main(["--config", str(TINY_SWEEP), "--name", "dry", "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    # The grid: each rank of configs/sweep/tiny.yaml x both ends of its log-uniform learning-rate range.
    assert "dry: grid over lora.r, train.lr; 8 trial(s) planned; 20 steps each" in out
    assert "grid: lora.r [4, 8, 16, 32] x train.lr [0.0003, 0.01] = 8 point(s)" in out
    # 20 steps x 0.05 s + 20 s start-up = 21 s at $0.048/h: $0.00028 a trial, 35 of them in $0.01; 4 rounds of 2.
    assert ("estimated full trial: 20 steps x 0.05 s (configured budget.step_time_s) + 20 s start-up = 21 s -> $0.00028"
            in out)
    assert "budget $0.0100: 35 full trial(s) fit" in out
    assert "2 trial(s) at once -> about 1.4 min at full length" in out
    assert "dry run: no trials started" in out
    assert not (tmp_path / "sweeps" / "dry").exists()
    assert held_cpus() == 0


def test_resume_from_the_bucket_on_another_machine(ray_local, tiny_model_dir, sample_data_path, s3, tmp_path):
    import optuna

    endpoint, client = s3
    uri, prefix = f"s3://{BUCKET}/runs/sweeps/s3", "runs/sweeps/s3/"
    # Model and data by path: the second machine's FTUNE_HOME has neither (and must not build them).
    args = small(f"s3://{BUCKET}/runs", f"job.storage.endpoint_url={endpoint}", f"job.model.name_or_path={tiny_model_dir}",
                 f"job.data.path={sample_data_path}", "search.algorithm=random", "search.num_samples=3",
                 "search.asha.enabled=false", "job.tracking.wandb=disabled", "budget.usd=1.0",
                 "job.train.max_steps=6", "job.train.eval_every=3", "job.train.checkpoint_every=3")
    base_env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    first_home, second_home = tmp_path / "machine1", tmp_path / "machine2"
    # Bad luck made certain: Tune saves its experiment state (which trials run, the searcher) only at its first
    # step, while the study and the ledger keep up with every trial. The driver dies with its Tune state as far
    # behind them as it can be, so the resumed Tune re-runs the trial the study has already finished.
    driver = subprocess.Popen([sys.executable, "-m", "tune", "--config", str(TINY_SWEEP), "--name", "s3", *args],
                              cwd=REPO, env={**base_env, "FTUNE_HOME": str(first_home), "TUNE_GLOBAL_CHECKPOINT_S": "3600"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def first_done_in_bucket() -> bool:
        spend = bucket_json(client, f"{prefix}spend.json")
        return bool(spend) and any(t["status"] == "completed" for t in spend["trials"]) and study_told_an_end()

    def study_told_an_end() -> bool:
        """Whether the study in the bucket has a trial's end (Optuna told it after the ledger saw it)."""
        client.download_file(BUCKET, f"{prefix}optuna.db", str(tmp_path / "pushed.db"))
        with closing(sqlite3.connect(tmp_path / "pushed.db")) as db:
            return db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0] > 0

    # Killed as soon as a trial's end is in the bucket, ledger and study. Two trials run at once and the third
    # starts only when one ends, so at the kill one trial is cut off mid-run and the third has its run ahead.
    wait_for(lambda: first_done_in_bucket() or driver.poll() is not None, "the first trial's end in the bucket", 400)
    assert driver.poll() is None, "the sweep ended before it could be interrupted"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    shutil.rmtree(first_home)  # nothing of the first machine is left but the bucket
    before = bucket_json(client, f"{prefix}spend.json")
    done = {t["trial_id"]: t for t in before["trials"] if t["status"] == "completed"}
    assert done and before["spent_usd"] >= sum(t["cost_usd"] for t in done.values()) > 0
    metrics_before = {tid: read_bucket(client, f"{prefix}trials/{tid}/metrics.jsonl") for tid in done}

    resumed = subprocess.run([sys.executable, "-m", "tune", "--resume", uri], cwd=REPO, capture_output=True, text=True,
                             env={**base_env, "FTUNE_HOME": str(second_home), "AWS_ENDPOINT_URL": endpoint}, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming s3: ${before['spent_usd']:.4f} spent so far" in resumed.stdout
    assert (second_home / "sweeps" / "s3" / "tune").is_dir()
    after = bucket_json(client, f"{prefix}spend.json")
    trials = {t["trial_id"]: t for t in after["trials"]}
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials.values()), trials
    for tid, t in done.items():  # finished trials were not re-run: same time, same cost, same metrics
        assert trials[tid]["segments"] == t["segments"] and trials[tid]["cost_usd"] == pytest.approx(t["cost_usd"])
        assert read_bucket(client, f"{prefix}trials/{tid}/metrics.jsonl") == metrics_before[tid]
    assert after["spent_usd"] > before["spent_usd"]
    rows = bucket_json(client, f"{prefix}leaderboard.json")
    assert len(rows) == 3 and bucket_json(client, f"{prefix}best/adapter/adapter_config.json") is not None
    client.download_file(BUCKET, f"{prefix}optuna.db", str(tmp_path / "optuna.db"))
    study = optuna.load_study(study_name="s3", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    # Each trial told its end once, with the value the ledger has. A suggestion the study took after Tune's state was
    # saved (the third trial's, if the kill came after it) never ran: told failed, not left running.
    ended = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in ended) == pytest.approx(sorted(t["eval_loss"] for t in trials.values())), study.trials
    lost = [t for t in study.trials if t not in ended]
    assert len(lost) <= 1 and all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs == {LOST_WITH_DRIVER: True}
                                  for t in lost), lost
