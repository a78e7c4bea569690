"""Calibration data (C4 recipe, local files, text the model writes itself) and evaluation corpora."""
