"""Deep features: MONAI backbones, weight loading, Lightning extraction, feature cache."""
