#!/usr/bin/env bash
# Make sure a RabbitMQ answers on 127.0.0.1:5672: start the local server if it is installed but
# not running; install it from Debian's packages when SF_DAQ_REQUIRE_RABBITMQ is set (CI).
set -euo pipefail
port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
port_open && exit 0
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ -z "${SF_DAQ_REQUIRE_RABBITMQ:-}" ]; then
    echo "RabbitMQ is not installed: the tests that need it will be skipped" >&2
    exit 0
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server
fi
echo "starting RabbitMQ" >&2
rabbitmq-server -detached || true
for _ in $(seq 1 240); do
  port_open && exit 0
  sleep 0.5
done
echo "RabbitMQ did not come up on 127.0.0.1:5672 within 120 s" >&2
exit 1
