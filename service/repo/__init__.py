"""The model-repository contract that ``export/`` writes and the server reads (torch-free)."""
