"""A plan never makes a device slower than LUC's own kernels: its first real steps are checked against its prediction.

The cost model times each kernel and the rest of the model apart; what it cannot see (streamed
reads contending with compute on few cores, page-cache misses, a machine unlike the one the
table was measured on) shows only in real steps. On an Intel Xeon a plan predicted at 1.26 s
per training step ran 9.73 s against 2.04 s on LUC's own kernels. So `PlanCheck`, the
`on_step` callback of `edgecore.finetune.train`, times the plan's first steps (after a warm-up
step: allocation, page-in). If they run over the prediction by more than `TOLERANCE`, or over
what LUC's own kernels are predicted to take, it takes the plan out and times LUC's own for as
many steps, then keeps whichever measured faster (putting the plan back if LUC's turned out
slower). Every step still trains: only the kernels under it change, between optimizer steps.

The outcome is a `Verdict`, saved as JSON per plan and machine (`verdict_path`), so that a later
process on the same device does not install a plan it already measured slower
(`should_install`). A run too short to finish the check leaves the plan installed and no verdict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from edgecore.errors import EdgecoreError
from edgecore.schedule.costs import cache_dir, machine_id
from edgecore.schedule.executor import Executor
from edgecore.schedule.planner import ExecutionPlan

log = logging.getLogger(__name__)

# The schedule benchmark's plans without streaming measured 0.85-1.29x their prediction on its
# 2-core CPU (simulations/bench/results/schedule.json); the streaming one 2.0x, the Xeon's 7.7x.
TOLERANCE = 1.5
WARMUP_STEPS = 1  # skipped on each side: the first step on new kernels allocates and pages in
CHECK_STEPS = 2  # timed on each side (their median): few, so a slow plan costs little before it is taken out
PLAN, LUC = "plan", "luc"


@dataclass(frozen=True)
class Verdict:
    """What the check measured and kept; seconds are medians per step."""

    kept: str  # PLAN or LUC
    plan_s: float
    luc_s: float | None  # None when the plan ran as predicted (LUC's own was not timed)
    predicted_s: float  # the plan's prediction
    luc_predicted_s: float
    reason: str
    plan_key: str = ""  # `plan_key` of the plan checked: a verdict says nothing about another plan or machine

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Verdict:
        """The verdict `to_dict` gave; ValueError or TypeError when `raw` is none."""
        verdict = cls(**raw)
        if verdict.kept not in (PLAN, LUC):
            raise ValueError(f"it keeps {verdict.kept!r}")
        return verdict

    def save(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> Verdict | None:
        """The verdict saved at `path`; None when there is none."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise EdgecoreError(f"plan verdict {path} is unreadable ({err}); delete it to check again") from err


def plan_key(plan: ExecutionPlan) -> str:
    """Names a plan on this machine: its workload, and per weight its kernels, streamed or parked."""
    choices = [(c.name, sorted(c.kernels.items()), c.streamed, c.parked) for c in plan.choices]
    text = json.dumps([machine_id(), plan.workload.key, choices])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def verdict_path(plan: ExecutionPlan, folder: Path | None = None) -> Path:
    """Where the verdict on `plan` on this machine is kept (under $EDGECORE_CACHE/schedule/verdicts by default)."""
    return (folder or cache_dir() / "verdicts") / f"{plan_key(plan)}.json"


def should_install(verdict: Verdict | None, plan: ExecutionPlan) -> bool:
    """False only when `verdict` is about this very plan here and kept LUC's own kernels over it."""
    return verdict is None or verdict.plan_key != plan_key(plan) or verdict.kept == PLAN


class PlanCheck:
    """`on_step` callback timing an installed plan against its prediction, with fallback (see the module docstring).

    `luc_predicted_s` is LUC's own plan's prediction for the same workload. `luc` is LUC's own
    plan installed when falling back, for when LUC's kernels fit the budget only with layers
    streamed; by default the plan is just taken out (every weight back on LUC's kernel). With
    `path`, the verdict is saved there once reached.
    """

    def __init__(self, executor: Executor, luc_predicted_s: float, *, predicted_s: float | None = None,
                 luc: Executor | None = None, tolerance: float = TOLERANCE, warmup: int = WARMUP_STEPS,
                 steps: int = CHECK_STEPS, path: Path | str | None = None):
        if not executor.installed:
            raise EdgecoreError("install the plan before checking it")
        if steps < 1 or warmup < 0:
            raise EdgecoreError(f"a check times one step or more after its warm-up (steps={steps}, warmup={warmup})")
        self.executor, self.luc = executor, luc
        self.predicted_s = executor.plan.predicted_seconds if predicted_s is None else predicted_s
        self.luc_predicted_s, self.tolerance, self.steps = luc_predicted_s, tolerance, steps
        self.warmup, self.path = warmup, path
        self.running = PLAN
        self.times: dict[str, list[float]] = {PLAN: [], LUC: []}
        self._skip = warmup
        self.verdict: Verdict | None = None

    def __call__(self, record) -> None:
        """Take one finished step (`record.step_s`): the step after it runs on whatever this leaves installed."""
        if self.verdict is not None:
            return
        if self._skip:
            self._skip -= 1
            return
        self.times[self.running].append(record.step_s)
        if len(self.times[self.running]) < self.steps:
            return
        plan_s = statistics.median(self.times[PLAN])
        if self.running == PLAN:
            if plan_s > self.tolerance * self.predicted_s or plan_s > self.luc_predicted_s:
                log.warning("the plan ran %.3f s a step, predicted %.3f s (LUC's own: %.3f s): timing LUC's own",
                            plan_s, self.predicted_s, self.luc_predicted_s)
                self._switch(LUC)
            else:
                self._decide(PLAN, plan_s, None, "measured as predicted")
            return
        luc_s = statistics.median(self.times[LUC])
        if luc_s < plan_s:
            self._decide(LUC, plan_s, luc_s, "the plan measured slower than LUC's own kernels")
        else:
            self._switch(PLAN)
            self._decide(PLAN, plan_s, luc_s, "the plan ran slower than predicted, LUC's own kernels slower still")

    def finish(self) -> Verdict | None:
        """The verdict, or None when the run was too short for it; then the plan is installed again, as it began."""
        if self.verdict is None and self.running == LUC:
            self._switch(PLAN)
        return self.verdict

    def _switch(self, to: str) -> None:
        """Between two optimizer steps: nothing of the last step's graph is left to run through the kernels."""
        if to == LUC:
            self.executor.uninstall()
            if self.luc is not None:
                self.luc.install()
        else:
            if self.luc is not None:
                self.luc.uninstall()
            self.executor.install()
        self.running, self._skip = to, self.warmup

    def _decide(self, kept: str, plan_s: float, luc_s: float | None, reason: str) -> None:
        self.verdict = Verdict(kept, plan_s, luc_s, self.predicted_s, self.luc_predicted_s, reason,
                               plan_key(self.executor.plan))
        log.info("plan check: kept %s (%s)", kept, reason)
        if self.path is not None:
            self.verdict.save(self.path)
