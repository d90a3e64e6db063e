"""Imaging: MONAI preprocessing, ROI crops, seeded segmentation, measurements, QC."""
