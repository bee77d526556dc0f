"""Built-in demo tasks that need no download: char-LM on stdlib source, digits, synthetic."""
