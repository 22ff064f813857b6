"""The real PyTorch runtime: TorchBackend + wall-clock driver (with wicore/model/, the only torch users)."""
