"""Sweep configs: the space, the search and the pricing are checked up front, errors name file:line and the fix."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest

from ftune.errors import ConfigError
from ftune.yaml_config import load_config
from tune.config import SweepConfig
from tune.pricing import PricingTable, TrialShape, hourly_rate, load_pricing
from tune.space import ALPHA_PER_R, SearchSpace

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # base: and compute.pricing are relative to the working directory


def sweep_file(tmp_path: Path, space: str, extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    text = "base: configs/train/tiny.yaml\njob:\n  scaling: {num_workers: 1}\nspace:\n" + textwrap.indent(
        textwrap.dedent(space).strip(), "  "
    ) + "\n" + textwrap.dedent(extra)
    path.write_text(text)
    return path


def problems_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(SweepConfig, path, overrides or [])
    return str(e.value)


def test_shipped_tiny_sweep_loads():
    cfg = load_config(SweepConfig, REPO / "configs/sweep/tiny.yaml", [])
    job = cfg.job_config()
    assert job.scaling.num_workers == 1 and job.train.max_steps == 60
    space = SearchSpace.from_config(cfg)
    assert [d.key for d in space.dims] == ["lora.r", "train.lr"] and space.alpha_ratio == 2.0


def test_unknown_parameter_gets_did_you_mean_and_line(tmp_path):
    path = sweep_file(tmp_path, """
        lora.rank: {choice: [8, 16]}
        train.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
    """)
    msg = problems_of(path)
    assert "2 problems" in msg
    assert f"{path}:5: space.lora.rank: unknown parameter 'lora.rank'; did you mean 'lora.r'?" in msg
    assert f"{path}:6: space.train.learning_rate" in msg and "did you mean 'train.lr'?" in msg


def test_unknown_distribution_low_high_and_empty_choice(tmp_path):
    path = sweep_file(tmp_path, """
        lora.r: {choice: []}
        train.lr: {log_uniform: [1.0e-4, 1.0e-2]}
        lora.dropout: {uniform: [0.2, 0.1]}
        train.weight_decay: {loguniform: [0.0, 0.1]}
    """)
    msg = problems_of(path)
    assert f"{path}:5: space.lora.r" in msg and "choice is empty" in msg
    assert f"{path}:6: space.train.lr" in msg and "unknown distribution 'log_uniform'; did you mean 'loguniform'?" in msg
    assert f"{path}:7: space.lora.dropout" in msg and "uniform low 0.2 >= high 0.1" in msg
    assert f"{path}:8: space.train.weight_decay" in msg and "loguniform needs low > 0" in msg


def test_values_are_checked_against_the_job_fields(tmp_path):
    path = sweep_file(tmp_path, """
        lora.r: {choice: [0, 8]}
        train.lr: {loguniform: [1.0e-4, 3.0]}
        lora.use_dora: {uniform: [0, 1]}
    """)
    msg = problems_of(path)
    assert "space.lora.r: 0 is not a valid lora.r" in msg
    assert "space.train.lr: 3.0 is not a valid train.lr" in msg
    assert "space.lora.use_dora: lora.use_dora is not continuous; use choice" in msg


def test_ratio_needs_r_in_the_space(tmp_path):
    path = sweep_file(tmp_path, """
        lora.alpha: {ratio: 2}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    """)
    msg = problems_of(path)
    assert f"{path}:5: space.lora.alpha: ratio without lora.r in the space" in msg
    assert "set lora.alpha directly" in msg


def test_pbt_refuses_to_mutate_rank(tmp_path):
    path = sweep_file(tmp_path, """
        lora.r: {choice: [8, 16]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    """, "search:\n  algorithm: pbt\n  pbt:\n    mutate: [train.lr, lora.r]\n")
    msg = problems_of(path)
    assert f"{path}:10: search.pbt.mutate: PBT cannot mutate lora.r: weights cannot move between ranks" in msg


def test_pbt_without_anything_to_mutate_and_misaligned_interval(tmp_path):
    path = sweep_file(tmp_path, "lora.r: {choice: [8]}", "search:\n  algorithm: pbt\n  pbt:\n    perturbation_interval_steps: 15\n")
    msg = problems_of(path)
    assert "search.algorithm: pbt needs train.lr and/or lora.alpha" in msg
    assert f"{path}:9: search.pbt.perturbation_interval_steps: 15 is not a multiple of train.checkpoint_every (40)" in msg


def test_job_overrides_are_validated_with_their_lines(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("base: configs/train/tiny.yaml\njob:\n  train:\n    learning_rate: 0.1\nspace:\n  train.lr: {choice: [0.001]}\n")
    msg = problems_of(path)
    assert f"{path}:4: job.train.learning_rate: unknown key. did you mean 'train.lr'?" in msg


def test_missing_base_and_pricing_and_unknown_instance(tmp_path):
    path = sweep_file(tmp_path, "train.lr: {choice: [0.001]}")
    assert "base: 'nope.yaml' not found" in problems_of(path, ["base=nope.yaml"])
    msg = problems_of(path, ["compute.pricing=configs/pricing/aws.yaml", "compute.instance_type=g5.12xl"])
    assert "override 'compute.instance_type=g5.12xl'" in msg and "did you mean 'g5.12xlarge'?" in msg
    msg = problems_of(path, ["compute.pricing=configs/pricing/aws.yaml", "compute.instance_type=g5.xlarge"])
    assert "is a GPU type but the job trains on CPU" in msg


def test_space_override_from_the_command_line(tmp_path):
    path = sweep_file(tmp_path, "lora.r: {choice: [8, 16]}\ntrain.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    cfg = load_config(SweepConfig, path, ["space.lora.r={choice: [4]}"])
    assert cfg.space["lora.r"].choice == [4]


def test_job_overrides_derive_alpha_and_decode_lists(tmp_path):
    path = sweep_file(tmp_path, """
        lora.r: {choice: [4, 16]}
        lora.alpha: {ratio: [1, 2]}
        lora.target_modules: {choice: [all-linear, [q_proj, v_proj]]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    """)
    space = SearchSpace.from_config(load_config(SweepConfig, path, []))
    config = {"lora.r": 16, ALPHA_PER_R: 2, "lora.target_modules": "q_proj,v_proj", "train.lr": 3e-3}
    assert space.job_overrides(config, base_r=8) == {
        "lora.r": 16, "lora.target_modules": ["q_proj", "v_proj"], "train.lr": 3e-3, "lora.alpha": 32.0
    }
    assert space.grid_size(3) == 2 * 2 * 2 * 3
    assert space.grid(3)["train.lr"] == [1e-4, 1e-3, 1e-2]
    assert space.pbt_mutations(["lora.alpha"]) == {ALPHA_PER_R: [1, 2]}


def test_pricing_tables_and_trial_rates():
    aws = load_pricing(REPO / "configs/pricing/aws.yaml")
    assert isinstance(aws, PricingTable)
    assert {"g5.xlarge", "g5.2xlarge", "g5.12xlarge", "g6.xlarge", "p4d.24xlarge", "p5.48xlarge", "m6i.2xlarge",
            "cpu-worker"} <= set(aws.instance_types)
    assert all(t.spot is None or t.spot < t.on_demand for t in aws.instance_types.values())
    # 2 workers x 1 GPU on a 4-GPU g5.12xlarge: half the node.
    two_gpus = TrialShape(workers=2, cpus_per_worker=4, gpus_per_worker=1, driver_cpus=0.5)
    assert two_gpus.nodes(aws.instance("g5.12xlarge")) == 0.5
    assert two_gpus.concurrency({"CPU": 96, "GPU": 8}) == 4
    cpu = TrialShape(workers=2, cpus_per_worker=1, gpus_per_worker=0, driver_cpus=0.5)
    assert cpu.concurrency({"CPU": 4}) == 1
    cfg = load_config(SweepConfig, REPO / "configs/sweep/tiny.yaml", ["compute.market=spot"])
    assert hourly_rate(cfg.compute, TrialShape(1, 1, 0, 0.5)) == pytest.approx(0.02)


def grid_space(tmp_path: Path, points: int) -> SearchSpace:
    path = sweep_file(tmp_path, """
        lora.r: {choice: [4, 16]}
        lora.alpha: {ratio: [1, 2]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        lora.dropout: {uniform: [0.0, 0.3]}
    """, f"search:\n  algorithm: grid\n  grid_points: {points}\n")
    cfg = load_config(SweepConfig, path, [])
    assert cfg.search.grid_points == points
    return SearchSpace.from_config(cfg)


def test_grid_points_are_log_spaced_for_loguniform_and_even_for_uniform(tmp_path):
    grid = grid_space(tmp_path, 4).grid(4)
    assert grid["lora.r"] == [4, 16] and grid[ALPHA_PER_R] == [1.0, 2.0]
    lrs = grid["train.lr"]
    assert lrs == pytest.approx([1e-4, 4.64159e-4, 2.15443e-3, 1e-2], rel=1e-5)
    assert lrs[0] == 1e-4 and lrs[-1] == 1e-2  # the range's ends exactly
    assert [b / a for a, b in itertools.pairwise(lrs)] == pytest.approx([10 ** (2 / 3)] * 3, rel=1e-5)
    assert grid["lora.dropout"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert grid_space(tmp_path, 2).grid(2)["train.lr"] == [1e-4, 1e-2]


def test_grid_sampler_visits_every_point_once_with_alpha_from_ratio(tmp_path):
    import optuna

    space = grid_space(tmp_path, 3)
    grid = space.grid(3)
    assert space.grid_size(3) == 2 * 2 * 3 * 3 == 36
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = []

    def objective(trial: optuna.Trial) -> float:
        dists = space.grid_distributions(3)  # what the sweep's OptunaSearch samples with GridSampler
        seen.append(tuple(trial.suggest_categorical(key, dist.choices) for key, dist in dists.items()))
        return 1.0

    study.optimize(objective, n_trials=100)  # the sampler stops the study once the grid is done
    assert sorted(seen) == sorted(itertools.product(*grid.values()))  # each point exactly once
    for r, ratio, lr, dropout in seen:
        job = space.job_overrides({"lora.r": r, ALPHA_PER_R: ratio, "train.lr": lr, "lora.dropout": dropout}, base_r=8)
        assert job == {"lora.r": r, "train.lr": lr, "lora.dropout": dropout, "lora.alpha": ratio * r}


def test_bad_grid_specs_name_the_line_and_fix(tmp_path):
    path = sweep_file(tmp_path, """
        lora.r: {choice: [8, 16, 8]}
        lora.alpha: {ratio: [2, 2.0]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    """, "search:\n  algorithm: grid\n")
    msg = problems_of(path)
    assert "2 problems" in msg
    assert f"{path}:5: space.lora.r: lists 8 more than once; give each value once" in msg
    assert f"{path}:6: space.lora.alpha: lists 2 more than once" in msg
    path.write_text(path.read_text() + "  grid_points: 1\n")
    msg = problems_of(path)
    assert f"{path}:10: search.grid_points: 1 is invalid: Input should be greater than or equal to 2" in msg
