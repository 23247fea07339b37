"""Training the BLIP-2 Q-Former: datasets, the synthetic shapes generator, stage-1/stage-2 losses,
torch.distributed helpers and the optimizer/scheduler.

Kept import-light on purpose: `import fovea.training` pulls in nothing; each concern is its own module
(`data`, `shapes`, `losses`, `distributed`, `optim`).
"""
