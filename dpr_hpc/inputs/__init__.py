"""The inputs of a stage: content hashes, the hub cache and pins, the data format and prepared data."""
