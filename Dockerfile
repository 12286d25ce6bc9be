# The one image of docker-compose.yml: broker, workers and simulators are the same program
# (`sf-daq-broker serve | worker KIND | simulate`), started with different commands.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first, so editing the code does not reinstall numpy, h5py and numba.
COPY pyproject.toml README.md ./
RUN mkdir sf_daq_broker && touch sf_daq_broker/__init__.py \
    && pip install . && pip uninstall -y sf-daq-broker && rm -rf sf_daq_broker build
COPY sf_daq_broker ./sf_daq_broker
COPY configs ./configs
COPY daq_client.py check.py ./
# A normal (non-editable) install: the default configuration is package data. configs/ stays in
# /app for docker-compose.yml, which points SF_DAQ_CONFIG and --config at its files.
RUN pip install --no-deps . && rm -rf build \
    && useradd --create-home --uid 1000 daq \
    && mkdir -p /data && chown daq /data
USER daq

EXPOSE 10002 8371 8372 8373 8374
CMD ["sf-daq-broker", "--help"]
