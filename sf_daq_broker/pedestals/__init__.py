"""``/take_pedestal``: the request, the detector procedure, the worker that retrieves and
computes, and the per-detector directory that makes a new pedestal the one in use."""
