"""The `adabatch` command: fit/validate/test (LightningCLI), sweep, plot."""
