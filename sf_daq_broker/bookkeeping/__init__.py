"""Bookkeeping of a pgroup: safe paths, run numbers, run and scan JSON, the CLOSED marker."""
