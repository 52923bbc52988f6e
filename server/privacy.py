"""The server's side of client-level differential privacy: the noisy equal-weight average and the privacy ledger.

The sensitivity argument, the neighbouring relation and what is public are in `federation.privacy`'s
docstring; the clip is there too, shared with the clients. Here:

- `private_average(global_arrays, updates, settings, rng)` (central mode): every accepted update is
  re-clipped to C against the global adapter cut to its rank, averaged element by element over the
  clients holding each element with weight 1 each (`aggregation.partial_average`), and each
  element's mean gets N(0, (z*C/n)^2) noise, n its holders (`aggregation.holder_counts`). It returns
  what `partial_average` returns (averaged arrays, contributors per tensor), so the strategy calls it
  in its place and the server optimizer steps on it as usual.
- `PrivacyLedger`: Flower's RdpAccountant for the run. `would_exceed(sampled)` before a round (the
  budget stop), `record_round(sampled)` after it (one Gaussian event; returns epsilon at delta).

How the strategy uses them (FleetStrategy):
    setup      ledger = PrivacyLedger.for_experiment(experiment, population); settings = DpSettings.of(experiment);
               rng = np.random.default_rng()  (operating-system entropy: never the run's public seed);
               every TrainInstruction carries dp=settings;
    configure  before sampling: stop the run if ledger.would_exceed(sampled, available);
    aggregate  central: private_average(global, [reply.arrays for accepted], settings, rng) instead of
               partial_average / the robust averages, no examples weighting, no median-relative drop;
               local: the usual average (post-processing), with Expectation.max_update_norm at least
               federation.privacy.noisy_norm_limit(settings, elements sent);
               then epsilon = ledger.record_round(sampled, available), for the round's record.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, PrivacySpent, SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from federation.privacy import DpSettings, add_noise, clipped_update
from server.aggregation import Arrays, holder_counts, partial_average

# The sensitivity of the per-element sums is 2C under replace-one (federation.privacy), so the
# accountant's noise multiplier (std / sensitivity) is z*C / 2C.
REPLACE_ONE_SENSITIVITY = 2.0

# mode -> how rounds compose: the pairs Flower's RdpAccountant accepts (federation.privacy's docstring says why).
ACCOUNTING = {
    "central": (NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT),
    "local": (NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION),
}


# --- Central mode: the noisy average --------------------------------------------------------


def reclipped(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]], clip_norm: float) -> list[Arrays]:
    """Every update clipped again to clip_norm (float64) against the global adapter cut to its rank."""
    return [clipped_update(update, global_arrays, clip_norm) for update in updates]


def private_average(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]],
                    settings: DpSettings, rng: np.random.Generator) -> tuple[Arrays, dict[str, int]]:
    """Central DP's aggregate: the re-clipped updates' equal-weight partial average plus N(0, (z*C/n)^2) on
    every element held by n >= 1 clients; elements nobody holds keep the global value, unnoised.

    Same return as `aggregation.partial_average` (arrays, contributors per tensor). `updates` are the
    accepted replies' arrays (run update_problems first); `rng` must not be seeded from anything public.
    """
    if settings.mode != "central":
        raise EdgecoreError(f"private_average is central DP's aggregate; with dp-mode = {settings.mode!r} the "
                            "clients add the noise and the server averages as usual")
    clipped = reclipped(global_arrays, updates, settings.clip_norm)
    averaged, contributors = partial_average(global_arrays, [(update, 1.0) for update in clipped])
    counts = holder_counts(global_arrays, clipped)
    noisy = {name: np.asarray(averaged[name], dtype=np.float64) for name in counts}
    add_noise(noisy, {name: _element_std(settings, count) for name, count in counts.items()}, rng)
    for name, value in noisy.items():
        averaged[name] = value.astype(np.asarray(global_arrays[name]).dtype)
    return averaged, contributors


def _element_std(settings: DpSettings, holders: np.ndarray) -> np.ndarray:
    """z*C/n per element held by n clients (compute_stdv), 0 where nobody holds it."""
    std = np.zeros(holders.shape)
    held = holders > 0
    std[held] = compute_stdv(settings.noise_multiplier, settings.clip_norm, 1) / holders[held]
    return std


# --- The ledger -----------------------------------------------------------------------------


class PrivacyLedger:
    """The run's privacy spent, in Flower's RdpAccountant: one Gaussian event per round.

    Central: rounds sample clients without replacement from `population`; the epsilon is the run's
    client-level guarantee (replace-one). Local: each client's update is a release the server sees,
    with no amplification; the reported epsilon is that of a client that took part in every round so
    far, a bound for every client (each takes part at most once a round).

    `population` is the number of clients a round samples from. A round that samples from more
    (`available`) is accounted as if from `population`, at the same or a higher sampling rate: an
    upper bound. One that samples from fewer is refused, as it would overstate the amplification.
    """

    def __init__(self, mode: str, noise_multiplier: float, population: int, delta: float = 1e-5, max_epsilon: float = 0.0):
        if mode not in ACCOUNTING:
            raise EdgecoreError(f"dp-mode = {mode!r} has no privacy ledger; use one of {', '.join(ACCOUNTING)}")
        if isinstance(population, bool) or not isinstance(population, (int, np.integer)) or population < 1:
            raise EdgecoreError(f"population {population!r} must be the number of clients rounds sample from (>= 1)")
        if not noise_multiplier > 0:
            raise EdgecoreError(f"dp-noise-multiplier = {noise_multiplier!r} must be > 0 for a private run")
        if not max_epsilon >= 0:
            raise EdgecoreError(f"dp-max-epsilon = {max_epsilon!r} must be >= 0 (0 = no budget)")
        relation, sampling = ACCOUNTING[mode]
        try:
            self.config = PrivacyConfig(target_delta=float(delta), population_size=int(population),
                                        neighboring_relation=relation, sampling_method=sampling,
                                        max_epsilon=float(max_epsilon) if max_epsilon else None)
        except ValueError as err:
            raise EdgecoreError(f"dp-delta = {delta!r}: {err}") from None
        self.mode = mode
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = RdpAccountant(self.config)

    @classmethod
    def for_experiment(cls, experiment: Experiment, population: int) -> "PrivacyLedger | None":
        """The ledger of the experiment's dp-* keys; None when dp-mode is "off"."""
        if experiment.dp_mode == "off":
            return None
        return cls(experiment.dp_mode, experiment.dp_noise_multiplier, population,
                   delta=experiment.dp_delta, max_epsilon=experiment.dp_max_epsilon)

    @property
    def accounted_noise_multiplier(self) -> float:
        """What the accountant composes: z over the replace-one sensitivity in units of C (z/2)."""
        return self.noise_multiplier / REPLACE_ONE_SENSITIVITY

    @property
    def population(self) -> int:
        return self.config.population_size

    def event(self, sampled: int, available: int | None = None) -> GaussianPrivacyEvent:
        """One round's release: `sampled` clients drawn from `available` (default: the population)."""
        available = self.population if available is None else available
        for label, value in (("sampled", sampled), ("available", available)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EdgecoreError(f"{label} = {value!r} must be a whole number of clients >= 1")
        if available < self.population:
            raise EdgecoreError(f"a round sampling from {available} clients, fewer than the ledger's population "
                                f"{self.population}, would overstate the amplification; start the ledger with "
                                f"population <= the fewest clients a round samples from (min-clients)")
        if sampled > available:
            raise EdgecoreError(f"sampled = {sampled} exceeds the {available} clients it was sampled from")
        size = -(-self.population * int(sampled) // int(available))  # ceil: the sampling rate rounded up
        return GaussianPrivacyEvent(noise_multiplier=self.accounted_noise_multiplier, sample_size=size,
                                    population_size=self.population)

    def record_round(self, sampled: int, available: int | None = None) -> float:
        """Compose the round that sampled `sampled` clients; the epsilon spent so far at dp-delta."""
        self.accountant.compose(self.event(sampled, available))
        return self.epsilon

    def would_exceed(self, sampled: int, available: int | None = None) -> bool:
        """Whether the next round (sampling `sampled` clients) would take epsilon past dp-max-epsilon; never
        with no budget. Call it before sending the round's instructions, and stop the run when True."""
        if self.config.max_epsilon is None:
            return False
        return self.accountant.would_exceed(self.event(sampled, available))

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far at dp-delta (0 before the first round)."""
        return self.accountant.get_epsilon(self.config.target_delta) if self.accountant.num_releases else 0.0

    def spent(self) -> PrivacySpent:
        """Epsilon, delta, rounds composed and the RDP order that gave the epsilon."""
        return self.accountant.get_privacy_spent()

    def state_dict(self) -> dict[str, object]:
        """JSON-serialisable: the accountant's configuration and every event composed (for a resume)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a `state_dict` of a ledger with the same settings; EdgecoreError when they differ."""
        try:
            self.accountant.load_state_dict(state)
        except ValueError as err:
            raise EdgecoreError(f"privacy ledger state does not fit this run ({err}); resume with the same dp-* keys "
                                "and population") from None
