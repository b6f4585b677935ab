"""The pretraining engine: optimisers (`optim`), learning-rate schedules and progress
(`schedule`), atomic checkpoints (`checkpoint`), objectives and the training loop.

Submodules are imported where they are used, so `import motian.train` stays cheap.
"""
