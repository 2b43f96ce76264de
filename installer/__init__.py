"""Air-gapped install bundles (wheels, models, checksums). Not built yet: see the issues."""
