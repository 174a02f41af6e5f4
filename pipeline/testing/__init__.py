"""Test helpers shipped beside the library (as diffusers ships `utils/testing_utils.py`): stand-in checkpoints
in the real tools' formats and key names, built from the tiny model, for this project's tests and for anyone
checking a loader without downloading 28 GB."""
