"""Client-level differential privacy of adapter updates: the clip and the local noise, shared by client and server.

Pure numpy on `edgecore.wire` arrays, with Flower's DP building blocks
(`flwr.supercore.differential_privacy`: get_norm, clip_inputs_inplace, compute_stdv). The
server side (the noisy equal-weight average, the privacy ledger) is `server.privacy`.

What a client sends, and its delta
    A rank-r client receives the global adapter (rank R >= r) and sends back only the tensors
    it trained (its window's LoRA tensors and one exit adapter), each cut to rank r. Its delta
    is its update minus the global adapter cut to r (`update_delta`, which reads the rank off
    each sent tensor's shape): exactly the elements the server's `partial_average` counts as
    held by this client. An element it does not send is not part of its contribution at all.

Why the whole-update clip bounds one client (sensitivity)
    `clip_delta` scales the delta so that its L2 norm over EVERY tensor it sends, jointly, is
    at most C = dp-clip-norm (FlatClip, McMahan et al. 2018). Write the client's contribution
    as a vector over all elements of the global adapter, zero where it holds nothing: its L2
    norm is then <= C, whatever its rank and window. Clipping each tensor to C separately
    would not do: a client sending k tensors could move the sum by C * sqrt(k).

Central mode (dp-mode = "central")
    Clients clip; the server re-clips in float64 (it must not trust the client's clip) and
    sums, per element, the deltas of the clients that hold that element, each with weight 1.
    Equal weights are required: an examples-weighted mean gives a client claiming (or having)
    many examples an unbounded share, so no finite noise covers it. Replacing one client's
    data changes its contribution from u to u', both of norm <= C, so the vector of per-element
    sums moves by at most ||u - u'|| <= 2C in L2 (elements the client does not hold do not
    move). The server adds independent N(0, (z*C)^2) noise, z = dp-noise-multiplier, to every
    element's sum, then divides by the number n of clients holding that element: the mean of
    an element held by n clients carries noise of std z*C/n (`compute_stdv(z, C, n)`). The
    holder counts are public (below), so the division is post-processing. Elements nobody holds
    keep the global value and get no noise: no client's data reaches them.

Local mode (dp-mode = "local")
    Each client clips and adds N(0, (z*C)^2) to every element it sends (`privatize`), with
    noise drawn from the operating system's entropy, so nobody else can reproduce and remove
    it. Its reply is private on its own; whatever the server does with it (any average, any
    filter, the server optimizer) is post-processing. The price: the mean of n local updates
    carries noise of std z*C/sqrt(n), not the central mode's z*C/n.

Neighbouring relation and accounting (server.privacy.PrivacyLedger)
    Neighbouring federations differ in one client's whole data (replace-one, client level).
    Its sensitivity is 2C (above), so the accounted Gaussian noise multiplier is z*C / 2C = z/2
    in both modes. Central: Flower's FedAvg samples a fixed number of clients without
    replacement each round, so rounds are composed as sampled-without-replacement Gaussians
    (SamplingMethod.WITHOUT_REPLACEMENT with NeighboringRelation.REPLACE_ONE, the pair
    RdpAccountant accepts for it; Wang, Balle, Kasiviswanathan 2019). Local: the server sees
    each update, so there is no amplification; every round is a full Gaussian release for
    each client that took part (SamplingMethod.NO_AMPLIFICATION, which the accountant pairs
    with ADD_OR_REMOVE_ONE; without sampling the Gaussian's RDP depends only on std /
    sensitivity, so z/2 is the replace-one figure).

What is public, and what is not covered
    Who was sampled, their ranks, their windows and exits, and so the number of holders of
    every element, are treated as public: the server's assignment and the device profiles
    fix them, and the noise is calibrated on them. Sampling amplifies privacy only against an
    observer who does not learn who was sampled (the central server is the trusted curator;
    its run folder names the participants and must be kept as private as the updates). The
    guarantee covers the adapter updates only: a reply's other fields (examples, votes,
    layer importance, losses and timings) travel unprotected.

The client calls `privatize(update, received, settings)` before it replies; the server
re-clips with `clipped_update` (server.privacy.private_average does it) and, in local mode,
checks update norms against `noisy_norm_limit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

from edgecore.errors import EdgecoreError
from edgecore.experiment import DP_MODES, Experiment
from edgecore.wire import Arrays, rank_axis, rank_slice
from federation.validation import nonnegative_number, positive_number

MODES = tuple(mode for mode in DP_MODES if mode != "off")  # what a DpSettings may say
# A local update's noise norm exceeds sqrt(elements) * z * C by this many std at probability
# exp(-t^2 / 2) (Gaussian concentration of the norm): 10 std is ~2e-22, never in practice.
NORM_TAIL_STDS = 10.0


@dataclass(frozen=True)
class DpSettings:
    """What a private run tells every client: the mode, C, and z (the noise is z * C per element's sum)."""

    mode: str  # "central" or "local"
    clip_norm: float
    noise_multiplier: float

    def __post_init__(self):
        if self.mode not in MODES:
            raise EdgecoreError(f"dp-mode = {self.mode!r}; a private round is one of {', '.join(MODES)}")
        if positive_number(self.clip_norm):
            raise EdgecoreError(f"dp-clip-norm = {self.clip_norm!r}: {positive_number(self.clip_norm)}")
        problem = (positive_number if self.mode == "local" else nonnegative_number)(self.noise_multiplier)
        if problem:
            raise EdgecoreError(f"dp-noise-multiplier = {self.noise_multiplier!r} (dp-mode {self.mode!r}): {problem}")

    @classmethod
    def of(cls, experiment: Experiment) -> "DpSettings | None":
        """The experiment's settings; None when dp-mode is "off"."""
        if experiment.dp_mode == "off":
            return None
        return cls(experiment.dp_mode, experiment.dp_clip_norm, experiment.dp_noise_multiplier)

    @property
    def local_std(self) -> float:
        """The std of the noise a client adds to every element it sends (local mode; 0 in central)."""
        return compute_stdv(self.noise_multiplier, self.clip_norm, 1) if self.mode == "local" else 0.0


# --- Checks of one value ("" when fine; federation.protocol names the key) -----------------


def mode_problem(value) -> str:
    return "" if isinstance(value, str) and value in DP_MODES else f"expected one of {', '.join(DP_MODES)}"


# --- The clip -----------------------------------------------------------------------------


def _cut(name: str, value: np.ndarray, received: Mapping[str, np.ndarray]) -> np.ndarray:
    """The received tensor cut to the rank of the sent one (the slices the sender holds), float64."""
    if name not in received:
        raise EdgecoreError(f"{name}: not in the adapter the client received; a client may send only tensors it was sent")
    axis = rank_axis(name)
    reference = np.asarray(received[name])[rank_slice(axis, value.shape[axis])]
    if reference.shape != value.shape:
        raise EdgecoreError(f"{name}: shape {tuple(value.shape)} does not fit the received shape "
                            f"{tuple(np.shape(received[name]))} at any lower rank")
    return reference.astype(np.float64)


def update_delta(update: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> Arrays:
    """Every sent tensor minus the received tensor cut to its rank, in float64."""
    return {name: np.asarray(value, dtype=np.float64) - _cut(name, np.asarray(value), received)
            for name, value in update.items()}


def clip_delta(delta: Arrays, clip_norm: float) -> float:
    """Scale `delta` in place to L2 norm <= clip_norm over all its tensors jointly; returns the norm before."""
    norm = get_norm(list(delta.values()))
    if norm > clip_norm:  # also keeps flwr's clip from dividing by a zero norm
        clip_inputs_inplace(list(delta.values()), clip_norm)
    return norm


def clipped_update(update: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], clip_norm: float) -> Arrays:
    """The update with its delta from `received` clipped to clip_norm, float64 (what the server re-clips to)."""
    delta = update_delta(update, received)
    clip_delta(delta, clip_norm)
    return {name: _cut(name, value, received) + value for name, value in delta.items()}


# --- The client's step before it replies --------------------------------------------------


def privatize(update: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], settings: DpSettings | None,
              rng: np.random.Generator | None = None) -> Arrays:
    """What a client sends under `settings` (None: the update as it is): its delta from the adapter it
    received clipped to C, in local mode plus N(0, (z*C)^2) on every element; float32, as the wire carries.

    `rng` is for tests only: by default the noise comes from the operating system's entropy, so that
    nobody (the server included) can reproduce it; a generator seeded from the run's public seed
    would let anyone subtract the noise.
    """
    if settings is None:
        return dict(update)
    delta = update_delta(update, received)
    clip_delta(delta, settings.clip_norm)
    if settings.mode == "local":
        add_noise(delta, settings.local_std, rng if rng is not None else np.random.default_rng())
    return {name: (_cut(name, value, received) + value).astype(np.float32) for name, value in delta.items()}


def add_noise(arrays: Arrays, std: float | Mapping[str, np.ndarray], rng: np.random.Generator) -> None:
    """Add N(0, std^2) in place to every float64 element; `std` is one number or an array per tensor
    (server.privacy: z*C/n per element). Tensors in a fixed order, so a seeded `rng` reproduces."""
    for name in sorted(arrays):
        scale = std if isinstance(std, (int, float)) else std[name]
        arrays[name] += rng.standard_normal(arrays[name].shape) * scale


def noisy_norm_limit(settings: DpSettings, elements: int) -> float:
    """The largest honest L2 distance of a local-mode update of `elements` elements from the adapter it
    received: C plus the noise's norm, z*C*(sqrt(elements) + NORM_TAIL_STDS). The server's max-update-norm
    check must allow this much (max(max-update-norm, this)), or it rejects every honest noisy update."""
    return settings.clip_norm + settings.local_std * (math.sqrt(elements) + NORM_TAIL_STDS)
