"""Reading the users' files into a request: kept in ``daq_client.py``, which must stay one file
that needs only Python and requests (users copy it); imported from there under this old name."""

from sf_daq_broker.tools.daq_client import (
    InputFileError,
    RequestTemplate,
    read_json_object,
    read_names,
)

__all__ = ["InputFileError", "RequestTemplate", "read_json_object", "read_names"]
