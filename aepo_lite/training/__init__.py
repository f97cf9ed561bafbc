"""The training machinery, written once for the offline-RL agent, the toy tasks and the bench.

- :mod:`~aepo_lite.training.learners`: the learner interface (``step(batch) -> dict`` of 0-d tensors,
  ``state_dict`` / ``load_state_dict`` holding everything needed to resume) and the behaviour
  (denoising) and regression learners; the critics and the energy learner live beside their maths
  in :mod:`aepo_lite.core`.
- :mod:`~aepo_lite.training.stages`: a stage is a name, its config part, its upstream stages, a
  learner, a batch source and a step count; :func:`run_stages` trains a list of them with one
  checkpoint store (content-hashed, versioned, atomic, periodic inside a stage), one progress bar
  and metrics log, NaN checks at logged steps and per-stage seeding.
- :mod:`~aepo_lite.training.captured`: a learner's whole step captured as one CUDA graph (eager, with the
  same bookkeeping, on the CPU).
- :mod:`~aepo_lite.training.stacked`: several seeds' behaviour models, IQL critics or energy networks trained
  as one stacked model (one vmapped call, one Adam), each ending where its seed alone would (``train --seeds``).
"""
from aepo_lite.training.learners import BehaviourLearner, Learner, RegressionLearner
from aepo_lite.training.stages import RunLock, Stage, StageStore, run_stage, stage_hash
from aepo_lite.training.captured import CapturedStep
from aepo_lite.training.stacked import StackedBatches, StackedBehaviourLearner, StackedEnergyLearner, StackedCritic

__all__ = ["Learner", "BehaviourLearner", "RegressionLearner", "Stage", "StageStore", "RunLock", "run_stage",
           "stage_hash", "CapturedStep", "StackedBatches", "StackedBehaviourLearner",
           "StackedCritic", "StackedEnergyLearner"]
