"""Reads every twin of an IoT hub with Microsoft's official Python service client
(azure-iot-hub, `IoTHubRegistryManager.query_iot_hub`), page by page, and prints what it saw as
one JSON document, for the emulator's test to compare with what it serves.

Usage: iothub_query_check.py CONNECTION_STRING HOST:PORT PAGE_SIZE

The client is used as it comes: it builds `https://<HostName>` from the connection string,
signs with its own code, and verifies the server's certificate against REQUESTS_CA_BUNDLE.
Only name resolution is redirected: the connection string's HostName resolves to HOST:PORT
(the emulator), so the URL, the Host header, SNI and the certificate check are those the client
uses against a real hub.

A 429 reaches the caller as the client's HttpOperationError: its retry policy (msrest's, on
urllib3 2) retries no POST, so, as an application must, this script waits for the answer's
Retry-After and asks for the same page again.

Output:
{"devices": {"pages": [n, ...], "twins": [<twin>, ...], "throttled": [retry_after, ...]},
 "modules": {...}}
where each twin is the client's own deserialised Twin, serialised back to the REST names.
"""

import json
import socket
import sys
import time

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import QuerySpecification
from msrest.exceptions import HttpOperationError


def redirect(host_name, target_host, target_port):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, bytes):
            host = host.decode("ascii")
        if host is not None and host.lower() == host_name.lower():
            return real(target_host, target_port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


def read_all(manager, query, page_size):
    pages = []
    twins = []
    throttled = []
    token = None
    while True:
        try:
            result = manager.query_iot_hub(QuerySpecification(query=query), token, page_size)
        except HttpOperationError as error:
            response = error.response
            if response is not None and response.status_code == 429 and len(throttled) < 5:
                wait = float(response.headers.get("Retry-After", "1"))
                throttled.append(wait)
                time.sleep(wait)
                continue
            raise
        items = result.items or []
        pages.append(len(items))
        twins.extend(twin.serialize(keep_readonly=True) for twin in items)
        token = result.continuation_token
        if not token:
            return {"pages": pages, "twins": twins, "throttled": throttled}


def main():
    connection_string, target, page_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    parts = dict(part.split("=", 1) for part in connection_string.split(";") if part)
    target_host, target_port = target.rsplit(":", 1)
    redirect(parts["HostName"], target_host, int(target_port))
    manager = IoTHubRegistryManager.from_connection_string(connection_string)
    out = {
        "devices": read_all(manager, "SELECT * FROM devices", page_size),
        "modules": read_all(manager, "SELECT * FROM devices.modules", page_size),
    }
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
