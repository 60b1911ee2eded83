"""The pretext losses of the methods, one module per loss, importable without the method modules or MONAI transforms."""
