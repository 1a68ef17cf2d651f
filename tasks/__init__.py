"""Units of work: catalog, ingestion, fingerprints, sampling, training recipes, evaluation, registration."""
