"""Fast paths, applied from outside the one model (model.py) by the API and the training setup,
each proven against the plain path by a test: oneDNN-packed linears, int8 weights, the compiled
decode step, lean activation saving for the backward, the fused LM head + loss."""
