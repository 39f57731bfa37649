"""moec's passes. Importing this package registers every pass by its kebab-case name."""

from passes import cleanup, fold_weights

__all__ = ["cleanup", "fold_weights"]
