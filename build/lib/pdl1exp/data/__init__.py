"""Cohort data: manifest loading and validation, image readers, synthetic cohort, splits."""
