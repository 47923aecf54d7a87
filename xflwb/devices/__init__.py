"""Virtual phones, fleets, datasets and partitions."""
