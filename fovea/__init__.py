"""fovea: serve and train vision-language models."""
