"""The users' tools: daq_client, the start/stop client, check and broker_debugger.

They talk to the broker only through its public interfaces (HTTP, the status exchange, the
files it writes), exactly as a beamline's own scripts do, so they also prove those interfaces
are enough to work with.
"""
