"""Model code, apart from the stage drivers: encoder towers, DPR's loss, tokens and batching."""
