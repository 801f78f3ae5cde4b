"""Tune schedulers for trials that are whole Ray Train runs: ASHA and PBT, adapted.

``FinalStepASHA`` never stops a trial on its last step (it is about to write its adapter).

``CheckpointPBT`` is population-based training whose exploit really continues the donor's Ray Train
checkpoint. Tune's PBT exploits through Tune checkpoints, but a sweep trial's state lives in its Train run's
checkpoints (Tune only sees their paths, as the ``checkpoint_path`` metric of TuneReportCallback).
So on exploit this scheduler copies the donor's latest Train checkpoint into
``<sweep storage>/pbt/<trial>-xNN/checkpoint`` (shared storage: the workers read it) and hands the
exploiting trial a pointer checkpoint
(``exploit.json``); the trial restarts its TorchTrainer in run ``<trial>-xNN`` with
``init_checkpoint=<copy>, adopt=True``: the donor's weights, optimizer state and step, and the
trial's own perturbed learning rate and alpha. Every exploit is appended to the sweep directory's
``pbt_exploits.jsonl``. Ray Train may prune the donor's checkpoint before (or while) it is copied: a
copy that fails or does not verify against its manifests is removed and the exploit skipped, with a
line saying so; the trial continues unchanged.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import pyarrow.fs as pafs
import ray.tune as ray_tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ftune.compat.ray_private_hooks import PBTWithHooks
from ftune.storage import Storage
from train.checkpoint import CorruptCheckpoint, verify_checkpoint
from tune.sweep_session import SweepSession
from tune.trial import EXPLOIT_FILE, Exploit

log = logging.getLogger("ftune.tune")
PBT_DIR = "pbt"
EXPLOITS_FILE = "pbt_exploits.jsonl"


class FinalStepASHA(ASHAScheduler):
    """ASHA on the optimizer step that lets a trial reaching its last step finish (and export its adapter)."""

    def __init__(self, *, sweep_uri: str, total_steps: int, **kwargs: Any):
        super().__init__(time_attr="step", max_t=total_steps, stop_last_trials=False, brackets=1, **kwargs)
        self.sweep_uri = sweep_uri
        self.total_steps = total_steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """ASHA's decision, except on the final step; a stop is recorded in the ledger as pruned."""
        if result.get("step", 0) >= self.total_steps:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            SweepSession.of(self.sweep_uri).ledger.mark_pruned(trial.trial_id, int(result.get("step", 0)))
        return decision


class CheckpointPBT(PBTWithHooks):
    """PopulationBasedTraining over sweep trials (time attribute: the optimizer step)."""

    def __init__(self, *, sweep_uri: str, storage: Storage, total_steps: int, population_fits: bool, **kwargs: Any):
        super().__init__(time_attr="step", require_attrs=False, log_config=False, **kwargs)
        self.sweep_uri = sweep_uri
        self.storage = storage
        self.total_steps = total_steps
        self.population_fits = population_fits
        self.latest: dict[str, tuple[str, int]] = {}  # trial id -> (Train checkpoint path, step)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """Track the trial's latest Train checkpoint; perturb at interval steps, never at the last one."""
        if result.get("checkpoint_path"):
            self.latest[trial.trial_id] = (str(result["checkpoint_path"]), int(result["step"]))
        if result.get("step", 0) >= self.total_steps:
            return TrialScheduler.CONTINUE  # it finishes on its own (and writes its adapter)
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.PAUSE and self.population_fits and trial.status != "PAUSED":
            # PBT pauses a trial to give waiting ones a turn; with the whole population running at
            # once the only waiting trial is one being restarted after an exploit: no need to pause.
            return TrialScheduler.CONTINUE
        if decision == TrialScheduler.PAUSE:
            self.stop_run(trial)
        return decision

    def stop_run(self, trial) -> None:
        """Abort the Train run of a trial Tune pauses: its actor may be kept for another trial without being told."""
        registry = SweepSession.of(self.sweep_uri).placement_groups
        if registry is not None:
            registry.stop_runs([trial.trial_id])

    def choose_trial_to_run(self, tune_controller):
        """Paused trials first by training time; a population member starts only if the budget admits it."""
        ledger = SweepSession.of(self.sweep_uri).ledger
        if ledger.stop is not None:
            return None  # the budget stop is under way: nothing (re)starts
        waiting = [t for t in tune_controller.get_trials() if t.status in ("PENDING", "PAUSED")]
        for trial in sorted(waiting, key=self.last_train_time):
            if trial.status == "PAUSED" or trial.trial_id in ledger.trials:
                return trial
            decision = ledger.admit(trial.trial_id)
            if decision == "start":
                return trial
            ledger.exhausted = decision == "finished"
            return None
        return None

    def checkpoint_or_exploit(self, trial, tune_controller, upper_quantile: list, lower_quantile: list) -> None:
        """A top trial with a Train checkpoint becomes a donor; a bottom one exploits a copy of a donor's."""
        self.set_donor_checkpoint(trial, None)
        if trial in upper_quantile and trial.trial_id in self.latest:
            self.mark_donor(trial)  # the real pointer is made per exploit
        if trial not in lower_quantile:
            return
        donors = [t for t in upper_quantile if t.trial_id in self.latest]
        if not donors:
            log.info("[pbt] no donor has a checkpoint yet; trial %s continues unchanged", trial.trial_id)
            return
        donor = random.choice(donors)
        pointer = self._pointer(trial, donor)
        if pointer is None:
            return  # the donor's checkpoint is gone: no exploit this time
        self.set_donor_checkpoint(donor, pointer)
        self.exploit(tune_controller, trial, donor)

    def exploit(self, tune_controller, trial, trial_to_clone) -> None:
        """PBT's exploit, then a line in pbt_exploits.jsonl and on the terminal."""
        before = dict(trial.config)
        super().exploit(tune_controller, trial, trial_to_clone)  # pauses the trial
        self.stop_run(trial)
        pointer = self.donor_checkpoint(trial_to_clone)
        exploit = Exploit.read(pointer)
        row = {"time": time.time(), **(exploit.__dict__ if exploit else {}), "config_before": before,
               "donor_config": dict(trial_to_clone.config), "config_after": dict(trial.config)}
        with (SweepSession.of(self.sweep_uri).ledger.sweep_dir / EXPLOITS_FILE).open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        from tune.progress import say

        changed = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in trial.config.items() if before.get(k) != v)
        say(f"PBT: trial {trial.trial_id} continues {trial_to_clone.trial_id}'s checkpoint at step "
            f"{exploit.donor_step if exploit else '?'} ({changed or 'same settings'})")

    def _pointer(self, trial, donor) -> ray_tune.Checkpoint | None:
        """Copy the donor's latest Train checkpoint and write the exploit pointer for ``trial``; None (and a
        line saying why) if that checkpoint is gone or its copy does not verify."""
        source, step = self.latest[donor.trial_id]
        storage = self.storage
        fs, _ = storage.filesystem()
        n = 1
        while storage.exists(PBT_DIR, f"{trial.trial_id}-x{n:02d}"):
            n += 1
        run = f"{trial.trial_id}-x{n:02d}"
        target = storage.path(PBT_DIR, run)
        try:
            fs.create_dir(f"{target}/checkpoint", recursive=True)
            pafs.copy_files(source, f"{target}/checkpoint", source_filesystem=fs, destination_filesystem=fs)
            verify_checkpoint(f"{target}/checkpoint", fs)
        except (OSError, CorruptCheckpoint) as e:
            try:
                fs.delete_dir(target)
            except OSError:
                pass  # nothing was created
            if self.latest.get(donor.trial_id, (None,))[0] == source:
                del self.latest[donor.trial_id]  # Ray pruned it; the donor's next checkpoint replaces it
            from tune.progress import say

            say(f"PBT: trial {trial.trial_id} does not exploit {donor.trial_id}: its checkpoint at step {step} "
                f"({source}) is gone or incomplete ({e}); the trial continues unchanged")
            return None
        ledger = SweepSession.of(self.sweep_uri).ledger
        donor_run = ledger.trials[donor.trial_id].run if donor.trial_id in ledger.trials else donor.trial_id
        exploit = Exploit(trial.trial_id, donor.trial_id, donor_run, step, run, f"{target}/checkpoint")
        storage.write_text(exploit.to_json(), PBT_DIR, run, EXPLOIT_FILE)
        ledger.set_run(trial.trial_id, run)
        self.latest.pop(trial.trial_id, None)  # its old run's checkpoints are no longer its state
        return ray_tune.Checkpoint(target, filesystem=fs)
