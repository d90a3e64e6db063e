"""pdl1exp: experiment-tracked deep-learning radiomics for PD-L1 status from CT."""
