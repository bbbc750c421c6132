"""Mean-field two-layer networks trained by MFLD (the paper\x27s theory experiments)."""
