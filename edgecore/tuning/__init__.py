"""Adaptive-depth layer tuning: early exits on the shared head, window training, local voting.

- `runner`: DecoderRun, a decoder run one layer at a time.
- `exits`: exit placement and the low-rank exit adapters.
- `window`: the window loss, its depth from the memory budget, the adaptive exit rule.
- `voting`: per-exit votes, layer importance, early-exit inference.
- `adaptive`: prepare / tune / save / load in one place.
"""
