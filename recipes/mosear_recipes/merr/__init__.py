"""MERR data: file readers, tasks, dataset, single-task batch sampler, collator and a synthetic dataset."""
