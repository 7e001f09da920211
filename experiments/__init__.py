"""The paper's results, one program each, run from the repository's root:

    python -m experiments.momentum_toy       # Appendix B, Fig. 10: when momentum helps
    python -m experiments.batch_size_study   # Fig. 1a, 3, 4: loss against batch size, per optimizer
    python -m experiments.find_batch         # the smallest batch at the best throughput
    python -m experiments.memory             # Fig. 7: bytes of weights, state, accumulation
    python -m experiments.memory --measure   #   and what XLA's compiled step needs at its peak
    python -m experiments.finetune           # Fig. 8: fine-tuning at batch size 1, and LoRA
    python -m experiments.bf16_rounding      # Fig. 9: bf16 weights, nearest or stochastic rounding

Each imports the core (train, model, optim, data) and no other experiment; the core imports
nothing from here. experiments/README.md discusses each result.
"""
