"""Ingestion: readers per source kind, seeded synthetic generators, preprocessing, validation, writing."""
