"""Token routing (MoR): deep accelerator path vs shallow CPU path. Pure policy code."""
