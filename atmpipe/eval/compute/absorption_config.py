"""The absorption protocol's settings (SAEBench 0.6's values by default), apart from its computation
(`atmpipe.eval.compute.absorption`) so that the eval plug-in can declare its options from them without importing
torch or sklearn."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AbsorptionConfig:
    # The word sample: 0 = the whole vocabulary (SAEBench). Otherwise a uniform random sample (natural
    # letter frequencies), topped up to `min_words_per_letter` for letters the sample leaves short.
    sample_words: int = 0
    min_words_per_letter: int = 0
    sample_seed: int = 0  # the sample's own seed: `seed` varies the protocol's randomness over fixed words
    icl_examples: int = 10
    template: str = "{word} has the first letter:"
    train_fraction: float = 0.8
    # Ground-truth probe and the L1 ranking probe (SAEBench's train_multi_probe).
    probe_epochs: int = 50
    probe_lr: float = 1e-2
    probe_end_lr: float = 1e-5
    # SAEBench's train_and_save_probes trains the ground-truth probe in batches of 64; the L1 ranking probe
    # uses its eval config's k_sparse_probe_batch_size.
    probe_batch: int = 64
    sparse_probe_batch: int = 4096
    probe_weight_decay: float = 1e-4
    sparse_l1: float = 0.01
    sparse_weight_decay: float = 1e-6
    # Gates and the main-latent rule.
    probe_f1_gate: float = 0.6  # letters whose ground-truth probe test F1 is not above this are not evaluated
    min_letters: int = 20  # SAEBench reports nothing with fewer evaluable letters
    max_k: int = 10
    f1_jump: float = 0.03
    # The per-word calculator.
    absorber_cos: float = 0.1
    full_absorption_cos: float = 0.025
    projection_share: float = 0.4
    max_absorbers: int = 3
    bootstrap: int = 1000
    seed: int = 0
