"""`ray job submit` against a real local head with token auth, as the README runs it.

The training job trains, its logs show progress and the summary, and the run directory holds
``summary.json`` and the adapter; a config typo or a missing data file fails the job (the CLI exits 1,
the entrypoint 2) with the reason and the fix; the ``--working-dir`` upload leaves out local state,
caches and weights. The jobs go to the cluster at once, as a user's would: each waits mostly on
process start-up, so running them side by side keeps this module short on a small machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster.local import LocalCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
JOB_TIMEOUT_S = 400

# What a working checkout accumulates and the upload must leave out, with the rule that drops it.
PLANTED = {
    ".ftune_home/models/tiny-llama/model.safetensors": ".gitignore (CI's FTUNE_HOME=$PWD/.ftune_home)",
    "wandb/offline-run-1/run-1.wandb": ".gitignore",
    "runs/old-run/adapter/adapter_model.safetensors": ".rayignore",
    "configs/train/weights.safetensors": ".rayignore (*.safetensors anywhere)",
    ".git/objects/pack/pack-1.pack": "Ray's default excludes",
}

# Not copied from this checkout into the submitted source tree (the planted files stand for them).
CHECKOUT_STATE = shutil.ignore_patterns(
    ".git", ".ftune_home", "wandb", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"
)


def ray_cli() -> list[str]:
    """The ``ray`` console script of this interpreter (not whatever ``ray`` is first on PATH)."""
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def cli_env(auth: bool = True) -> dict[str, str]:
    """The user's shell: no RAY_ADDRESS, and ``RAY_AUTH_MODE=token`` unless ``auth`` is False."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def head(ftune_home):
    """A local head only (its dashboard is the job server); the training worker runs on it too."""
    cluster = LocalCluster(head_cpus=2, dashboard=True)
    cluster.up(workers=0)
    yield cluster
    cluster.down()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """This repository's source tree plus the local state a real checkout has, for ``--working-dir``."""
    root = tmp_path_factory.mktemp("job") / "ftune"
    shutil.copytree(REPO, root, ignore=CHECKOUT_STATE)
    for rel in PLANTED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(64 * 1024))
    return root


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """``storage.path`` of the jobs (the head runs on this machine, so the test reads it directly)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def jobs(head, checkout, storage, ftune_home) -> dict[str, subprocess.CompletedProcess]:
    """Submit every job side by side with the real CLI; their completed ``ray job submit`` processes."""
    runtime_env = {
        "env_vars": {"FTUNE_HOME": str(ftune_home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    }
    common = [f"storage.path={storage}", "tracking.wandb=disabled"]
    # name -> (send the token, overrides of configs/train/tiny.yaml)
    submissions = {
        "ok": (
            True,
            [
                # Shrunk for time: one worker (2-worker ZeRO-2 is test_train's), 600 rows, 4 steps.
                "scaling.num_workers=1",
                "data.max_rows=600",
                f"train.max_steps={STEPS}",
                f"train.eval_every={STEPS // 2}",
                f"train.checkpoint_every={STEPS}",
                "train.exact_match_examples=4",
                *common,
                "--name",
                "job-ok",
            ],
        ),
        "typo": (True, ["train.lrr=1", *common, "--name", "job-typo"]),
        "no-data": (True, ["data.path=data/missing.jsonl", *common, "--name", "job-no-data"]),
        "no-token": (False, ["train.max_steps=1", *common, "--name", "job-no-token"]),
    }

    def submit(auth: bool, overrides: list[str]) -> subprocess.CompletedProcess:
        command = [
            *ray_cli(), "job", "submit",
            "--address", head.dashboard_url,
            "--working-dir", str(checkout),
            "--runtime-env-json", json.dumps(runtime_env),
            "--", "python", "-m", "train", "--config", "configs/train/tiny.yaml", *overrides,
        ]  # fmt: skip
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=cli_env(auth),
            cwd=checkout,
            timeout=JOB_TIMEOUT_S,
            check=False,
        )

    with ThreadPoolExecutor(len(submissions)) as pool:
        futures = {name: pool.submit(submit, *args) for name, args in submissions.items()}
        return {name: future.result() for name, future in futures.items()}


def output(done: subprocess.CompletedProcess) -> str:
    """What the user sees: the CLI's own messages and the job's logs it tails."""
    return done.stdout + done.stderr


def test_the_job_server_refuses_a_client_without_the_token(jobs, storage):
    done = jobs["no-token"]
    assert done.returncode != 0
    assert "Authentication required" in output(done), output(done)[-3000:]
    assert "submitted successfully" not in output(done)
    assert not (storage / "job-no-token").exists()


def test_training_job_succeeds_and_shows_progress(jobs, storage):
    done = jobs["ok"]
    text = output(done)
    assert done.returncode == 0, text[-6000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", text)
    steps = [
        int(k) for k, n in re.findall(r"\[job-ok\] step (\d+)/(\d+) \| loss \d", text) if int(n) == STEPS
    ]
    assert steps and steps[-1] == STEPS, f"no progress lines up to step {STEPS}/{STEPS}:\n{text[-6000:]}"
    assert re.search(r"\[job-ok\] step \d+/\d+ .*\| eval loss \d+\.\d+ \(ppl", text)
    summary_line = re.search(
        rf"\[ftune\] run job-ok finished in [^\n]*: {STEPS} steps, [^\n]*eval loss [\d.]+ -> ", text
    )
    assert summary_line, text[-6000:]

    run_dir = storage / "job-ok"
    assert f"[ftune] run dir: {run_dir}" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert Path(summary["adapter_path"]) == run_dir / "adapter"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_config_typo_fails_the_job_with_the_fix(jobs):
    done = jobs["typo"]
    text = output(done)
    assert done.returncode == 1, text[-6000:]
    assert re.search(r"Job 'raysubmit_\w+' failed", text)
    assert "failed with exit code 2" in text  # ftune's exit code for a user mistake
    assert "configs/train/tiny.yaml" in text
    assert "train.lrr: unknown key. did you mean 'train.lr'?" in text
    assert "Traceback" not in text


def test_missing_data_file_fails_the_job_with_the_fix(jobs):
    done = jobs["no-data"]
    text = output(done)
    assert done.returncode == 1, text[-6000:]
    assert "failed with exit code 2" in text
    assert "data/missing.jsonl: data file not found" in text
    assert "check data.path" in text
    assert "Traceback" not in text


def test_upload_leaves_out_local_state_caches_and_weights(jobs, head):
    text = "".join(output(jobs[name]) for name in ("ok", "typo", "no-data"))
    packages = set(re.findall(r"gcs://(_ray_pkg_\w+)\.zip", text))
    assert len(packages) == 1, f"the jobs ship the same working dir: {packages}"
    (package,) = packages
    root = Path(head.base_dir, "head", "session_latest", "runtime_resources", "working_dir_files", package)
    assert root.is_dir(), f"{package} not unpacked on the head"
    for needed in (
        "train/__main__.py",
        "ftune/config.py",
        "configs/train/tiny.yaml",
        "configs/deepspeed/zero2.json",
    ):
        assert (root / needed).is_file(), f"{needed} missing from the uploaded working dir"
    shipped = [rel for rel in PLANTED if (root / rel).exists()]
    assert not shipped, "uploaded although excluded: " + ", ".join(f"{r} ({PLANTED[r]})" for r in shipped)
    assert not (root / "runs").exists() and not (root / ".ftune_home").exists()
