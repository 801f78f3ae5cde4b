"""Every entry of ftune.compat against the installed Ray, DeepSpeed, torch and PEFT: one test per entry.

A library upgrade that moves a private API ftune relies on fails here, by the entry's name.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftune.compat import deepspeed_private, optuna_private, peft_private, ray_private, torch_private

APPS = {"train", "tune", "serve", "cluster"}


def test_compat_imports_no_app_package():
    """ftune.compat is core: the apps import it, never the other way round."""
    for path in (Path(__file__).resolve().parents[2] / "ftune" / "compat").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not APPS & {n.split(".")[0] for n in names}, f"{path.name} imports {names}"


@pytest.fixture(scope="module")
def running_ray():
    """A small local Ray for the entries that need one (started once, at the first such test)."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# ---- ray_private: no Ray running needed ------------------------------------------------------------


def test_worker_log_printer_is_rays_printer():
    from ray._private import worker as ray_worker

    printer = ray_private.worker_log_printer()
    assert callable(printer) and printer is getattr(ray_worker, ray_private.WORKER_LOG_PRINTER)
    params = list(inspect.signature(printer).parameters)
    assert params[:2] == ["data", "print_file"], params  # what ftune.console's printer takes


def test_set_worker_log_printer_replaces_it():
    original = ray_private.worker_log_printer()

    def printer(data, print_file, ignore_prefix=False):
        pass

    try:
        ray_private.set_worker_log_printer(printer)
        assert ray_private.worker_log_printer() is printer
    finally:
        ray_private.set_worker_log_printer(original)
    assert ray_private.worker_log_printer() is original


def test_auth_token_present_is_a_bool():
    assert isinstance(ray_private.auth_token_present(), bool)


def test_forget_auth_token_runs():
    assert ray_private.forget_auth_token() is None


def test_token_auth_on_is_a_bool():
    assert isinstance(ray_private.token_auth_on(), bool)


def test_reload_ray_config_keeps_the_auth_mode():
    before = ray_private.token_auth_on()
    ray_private.reload_ray_config()
    assert ray_private.token_auth_on() == before  # the environment did not change


def test_without_datasets_callback_drops_only_it():
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    other = object()
    datasets = DatasetsCallback.__new__(DatasetsCallback)
    assert ray_private.without_datasets_callback([other, datasets]) == [other]


def test_without_placement_group_cleaner_drops_only_it():
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    other = object()
    cleaner = PlacementGroupCleanerCallback()
    assert ray_private.without_placement_group_cleaner([other, cleaner]) == [other]


def test_worker_group_placement_group_reads_the_state():
    from ray.train.v2._internal.execution.worker_group import WorkerGroup, placement_group_handle
    from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState
    from ray.util.placement_group import PlacementGroup, PlacementGroupID

    assert callable(WorkerGroup.get_worker_group_state)
    group = PlacementGroup(PlacementGroupID.nil())
    handle = placement_group_handle.DefaultPlacementGroupHandle(group)
    state = WorkerGroupState(start_time=0.0, placement_group_handle=handle, workers=[], sync_actor=None)
    worker_group = SimpleNamespace(get_worker_group_state=lambda: state)
    assert ray_private.worker_group_placement_group(worker_group) is group


def test_function_trainable_class_is_a_trainable():
    from ray.tune import Trainable

    def trainable(config):
        return None

    made = ray_private.function_trainable_class(trainable)
    assert inspect.isclass(made) and issubclass(made, Trainable)
    assert hasattr(made, "cleanup")  # what the sweep's trial class overrides


def test_on_multiplexed_unload_is_awaited_by_serves_lru_eviction():
    from ray.serve.multiplex import _ModelMultiplexWrapper

    unloaded = []

    async def unload() -> None:
        unloaded.append("a")

    model = SimpleNamespace()
    ray_private.on_multiplexed_unload(model, unload)
    def ignore(*args, **kwargs):
        return None

    counter = SimpleNamespace(inc=ignore, observe=ignore, set=ignore)  # Serve's metrics, not under test
    wrapper = SimpleNamespace(models=OrderedDict(a=model), models_unload_counter=counter,
                              model_unload_latency_ms=counter, registered_model_gauge=counter)
    asyncio.run(_ModelMultiplexWrapper.unload_model_lru(wrapper))
    assert unloaded == ["a"] and not wrapper.models


def test_serve_http_replica_targets_reads_the_controller_structures():
    """The controller call itself is exercised with Serve running, in the last test of this module."""
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX, RequestProtocol
    from ray.serve._private.controller import ServeController
    from ray.serve.schema import Target, TargetGroup

    assert isinstance(REPLICA_ID_FULL_ID_STR_PREFIX, str) and RequestProtocol.HTTP
    assert "app_name" in inspect.signature(ServeController.get_target_groups).parameters
    assert {"app_name", "protocol", "route_prefix", "targets"} <= set(TargetGroup.model_fields)
    assert {"ip", "port", "name"} <= set(Target.model_fields)


# ---- ray_private: with a running Ray -------------------------------------------------------------------


def test_session_log_dir_is_the_sessions_logs(running_ray):
    log_dir = ray_private.session_log_dir()
    assert log_dir is not None and os.path.isdir(log_dir) and log_dir.endswith("logs")


def test_gcs_client_lists_the_node(running_ray):
    address = running_ray.get_runtime_context().gcs_address
    client = ray_private.gcs_client(address)
    assert len(client.get_all_node_info(timeout=30)) == 1
    assert isinstance(client.get_draining_nodes(timeout=30), dict)
    assert callable(client.drain_node)


def test_local_cluster_address_reads_ray_address(running_ray, monkeypatch):
    address = running_ray.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert ray_private.local_cluster_address() == address


def test_serve_http_replica_targets_asks_the_controller(running_ray):
    from ray import serve as ray_serve

    ray_serve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        assert ray_private.serve_http_replica_targets("no-such-app") == []
    finally:
        ray_serve.shutdown()


# ---- ray_private_hooks -------------------------------------------------------------------------------


def test_trainer_hook_is_rays_default_callbacks():
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from ftune.compat.ray_private_hooks import TorchTrainerWithHooks

    seen = []

    class Trainer(TorchTrainerWithHooks):
        def default_callbacks(self, callbacks):
            seen.extend(callbacks)
            return callbacks[:1]

    trainer = Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert len(trainer._create_default_callbacks()) == 1 and len(seen) > 1
    assert "self._create_default_callbacks()" in inspect.getsource(TorchTrainer.fit)  # Ray still calls it


def test_controller_and_worker_group_callbacks_have_their_hooks():
    from ftune.compat.ray_private_hooks import ControllerCallback, WorkerGroupCallback

    assert list(inspect.signature(ControllerCallback.after_controller_start).parameters) == [
        "self", "train_run_context"]
    assert list(inspect.signature(WorkerGroupCallback.after_worker_group_start).parameters) == [
        "self", "worker_group"]


def _pbt():
    from ftune.compat.ray_private_hooks import PBTWithHooks

    return PBTWithHooks(time_attr="step", metric="loss", mode="min", perturbation_interval=1,
                        hyperparam_mutations={"lr": [1.0, 2.0]}, require_attrs=False, log_config=False)


NO_SEARCHER = SimpleNamespace(search_alg=None)
"""The only part of a Tune controller PBT's ``on_trial_add`` reads."""


def _trial(trial_id: str):
    from ray.tune.experiment import Trial

    return Trial("run_trial", config={"lr": 1.0}, trial_id=trial_id, stub=True)


def test_pbt_hooks_are_the_ones_pbt_calls():
    from ray.tune.schedulers import PopulationBasedTraining

    assert "self._checkpoint_or_exploit(" in inspect.getsource(PopulationBasedTraining.on_trial_result)
    assert "self._exploit(" in inspect.getsource(PopulationBasedTraining._checkpoint_or_exploit)
    assert list(inspect.signature(PopulationBasedTraining._checkpoint_or_exploit).parameters) == [
        "self", "trial", "tune_controller", "upper_quantile", "lower_quantile"]
    assert list(inspect.signature(PopulationBasedTraining._exploit).parameters) == [
        "self", "tune_controller", "trial", "trial_to_clone"]


def test_pbt_hooks_route_to_the_public_names():
    from ftune.compat.ray_private_hooks import PBTWithHooks

    calls = []

    class Scheduler(PBTWithHooks):
        def checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
            calls.append(("checkpoint_or_exploit", trial))

        def exploit(self, tune_controller, trial, trial_to_clone):
            calls.append(("exploit", trial))

    scheduler = Scheduler(metric="loss", mode="min", hyperparam_mutations={"lr": [1.0]})
    scheduler._checkpoint_or_exploit("t", None, [], [])
    scheduler._exploit(None, "t", "d")
    assert calls == [("checkpoint_or_exploit", "t"), ("exploit", "t")]


def test_pbt_last_train_time_starts_at_zero():
    pbt, trial = _pbt(), _trial("a")
    pbt.on_trial_add(NO_SEARCHER, trial)
    assert pbt.last_train_time(trial) == 0


def test_pbt_donor_checkpoint_round_trips():
    pbt, trial = _pbt(), _trial("a")
    pbt.on_trial_add(NO_SEARCHER, trial)
    assert pbt.donor_checkpoint(trial) is None
    pbt.set_donor_checkpoint(trial, "pointer")
    assert pbt.donor_checkpoint(trial) == "pointer"


def test_pbt_mark_donor_counts_a_checkpoint():
    pbt, trial = _pbt(), _trial("a")
    pbt.on_trial_add(NO_SEARCHER, trial)
    before = pbt._num_checkpoints
    pbt.mark_donor(trial)
    assert pbt.donor_checkpoint(trial) == pbt.DONOR_MARK and pbt._num_checkpoints == before + 1


def test_pbt_default_hooks_run_pbts_own_step_without_an_exploit():
    """PBT's own step on a trial in neither quantile: no checkpoint, no exploit (which needs a controller)."""
    pbt, trial = _pbt(), _trial("a")
    pbt.on_trial_add(NO_SEARCHER, trial)
    pbt.set_donor_checkpoint(trial, "stale")
    pbt.checkpoint_or_exploit(trial, None, [], [])
    assert pbt.donor_checkpoint(trial) is None


# ---- torch, DeepSpeed, PEFT ----------------------------------------------------------------------------


def test_extension_build_dir_is_under_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = torch_private.extension_build_dir("ftune_probe_op")
    assert path.startswith(str(tmp_path)) and path.endswith("ftune_probe_op") and os.path.isdir(path)


def test_set_last_lr_is_what_get_last_lr_returns():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch_private.set_last_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25]


def test_op_is_compatible_reads_deepspeeds_table():
    import deepspeed.ops

    table = deepspeed.ops.__compatible_ops__
    assert isinstance(table, dict) and "deepspeed_shm_comm" in table
    assert isinstance(deepspeed_private.op_is_compatible("deepspeed_shm_comm"), bool)
    assert deepspeed_private.op_is_compatible("no_such_op") is False


def test_register_loaded_op_is_what_the_builder_loads():
    from deepspeed.ops.op_builder.builder import OpBuilder
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    builder, module = ShareMemCommBuilder(), object()
    before = dict(OpBuilder._loaded_ops)
    try:
        deepspeed_private.register_loaded_op(builder, module)
        assert builder.load() is module  # no build step: the registered module comes back
    finally:
        OpBuilder._loaded_ops.clear()
        OpBuilder._loaded_ops.update(before)


def test_link_optimizer_state_calls_zeros_linker():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    linker = DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state
    assert list(inspect.signature(linker).parameters) == ["self"]
    linked = []
    zero = SimpleNamespace(_lazy_init_hp_params_optimizer_state=lambda: linked.append(True))
    assert deepspeed_private.link_optimizer_state(zero) is True and linked == [True]
    assert deepspeed_private.link_optimizer_state(SimpleNamespace()) is False


def _lora_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"],
                                                                                  init_lora_weights=False))
    return model.base_model.model[0]


def test_adapters_disabled_reads_the_layer():
    layer = _lora_layer()
    assert peft_private.adapters_disabled(layer) is False


def test_set_adapters_disabled_runs_the_base_layer_alone():
    layer = _lora_layer()
    x = torch.ones(1, 4)
    with torch.no_grad():
        with_adapter = layer(x)
        peft_private.set_adapters_disabled(layer, True)
        assert peft_private.adapters_disabled(layer) is True
        assert torch.allclose(layer(x), layer.base_layer(x)) and not torch.allclose(layer(x), with_adapter)
        peft_private.set_adapters_disabled(layer, False)
        assert torch.allclose(layer(x), with_adapter)
    assert all(p.requires_grad for n, p in layer.named_parameters() if "lora_" in n)  # left as they were


# ---- optuna_private ---------------------------------------------------------------------------------


def test_rdb_storage_state_with_url_moves_a_pickled_study(tmp_path):
    import pickle

    import optuna

    first, second = tmp_path / "a.db", tmp_path / "b.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{first}")
    optuna.create_study(study_name="s", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    state = pickle.loads(pickle.dumps(storage)).__getstate__()
    assert state[optuna_private.RDB_STORAGE_URL] == f"sqlite:///{first}"
    first.rename(second)
    moved = optuna.storages.RDBStorage.__new__(optuna.storages.RDBStorage)
    moved.__setstate__(optuna_private.rdb_storage_state_with_url(state, f"sqlite:///{second}"))
    assert len(optuna.load_study(study_name="s", storage=moved).trials) == 1


def test_optuna_search_internals_are_its_live_trials_and_study(tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)}, metric="m", mode="min",
                          storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}"), study_name="s")
    search.suggest("a")
    study, trials = optuna_private.optuna_search_study(search), optuna_private.optuna_search_trials(search)
    assert isinstance(study, optuna.Study) and list(trials) == ["a"] and trials["a"].number == 0
    search.suggest("b")
    assert list(trials) == ["a", "b"]  # the searcher's own map, not a copy
    live = optuna_private.live_trial(study, 1)
    assert live.params == trials["b"].params
    live.report(0.5, 1)
    study.tell(live, 0.25)
    assert [(t.state.name, t.value, t.intermediate_values) for t in study.get_trials()] == [
        ("RUNNING", None, {}), ("COMPLETE", 0.25, {1: 0.5})]
