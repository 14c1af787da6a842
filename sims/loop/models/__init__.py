"""Models of the generation loop that build on the SIMS stages (the toys live in :mod:`sims.toy`)."""
