"""HDF5 output files: writers of every layout, published atomically."""
