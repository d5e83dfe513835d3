"""Writes Avro fixtures with another Avro implementation (fastavro), using the schemas
Microsoft publishes, so that twinwatch's Avro reading is checked against files it did not
write itself.

    python write_avro_fixtures.py OUT_DIR

Writes, in OUT_DIR:
- capture/0/2024/06/01/00/00/00.avro  Event Hubs Capture EventData, codec null
- capture/0/2024/06/01/00/05/00.avro  Event Hubs Capture EventData, codec deflate
- capture/1/2024/06/01/00/00/00.avro  an empty container (Capture writes those)
- storage/hub/0/2024/06/01/00/10.avro IoT Hub storage-route Message, codec snappy
- storage/hub/0/2024/06/01/00/15.avro IoT Hub storage-route Message, codec deflate
"""

import json
import os
import sys

from fastavro import parse_schema, writer

CAPTURE = parse_schema({
    "type": "record", "name": "EventData", "namespace": "Microsoft.ServiceBus.Messaging",
    "fields": [
        {"name": "SequenceNumber", "type": "long"},
        {"name": "Offset", "type": "string"},
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "SystemProperties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Properties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
})

STORAGE = parse_schema({
    "type": "record", "name": "Message", "namespace": "Microsoft.Azure.Devices",
    "fields": [
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": "string"}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
})

HUB = "contoso-hub"


def body(value):
    return json.dumps(value).encode("utf-8")


def app(device, op, schema, time, module=None):
    props = {"hubName": HUB, "deviceId": device, "opType": op,
             "iothub-message-schema": schema, "operationTimestamp": time}
    if module:
        props["moduleId"] = module
    return props


def capture_record(seq, time, props, system, payload):
    return {"SequenceNumber": seq, "Offset": str(seq * 1000), "EnqueuedTimeUtc": time,
            "SystemProperties": system, "Properties": props, "Body": payload}


def main(out):
    def path(*parts):
        p = os.path.join(out, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    # Capture keeps the AMQP annotation names; IoT Hub's enqueued time is epoch milliseconds
    # and the user id is bytes.
    t1 = "2024-06-01T00:00:01.0000000Z"
    first = [
        capture_record(0, "6/1/2024 12:00:01 AM",
                       app("gw-1", "createDeviceIdentity", "deviceLifecycleNotification", t1),
                       {"iothub-connection-device-id": "gw-1", "iothub-enqueuedtime": 1717200001000,
                        "iothub-message-source": "deviceLifecycleEvents", "user-id": HUB.encode(),
                        "content-type": "application/json", "content-encoding": "utf-8"},
                       body({"deviceId": "gw-1", "etag": "AAAAAAAAAAE=", "version": 2,
                             "tags": {"env": "prod"},
                             "properties": {"desired": {"$metadata": {"$lastUpdated": t1}, "$version": 1},
                                            "reported": {"$metadata": {"$lastUpdated": t1}, "$version": 1}}})),
        capture_record(1, "6/1/2024 12:00:02 AM",
                       app("gw-1", "createDeviceIdentity", "deviceLifecycleNotification",
                           "2024-06-01T00:00:02.0000000Z", module="azureiotsecurity"),
                       {"iothub-connection-device-id": "gw-1", "iothub-connection-module-id": "azureiotsecurity",
                        "iothub-message-source": "deviceLifecycleEvents"},
                       body({"deviceId": "gw-1", "moduleId": "azureiotsecurity", "version": 2,
                             "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}})),
        # Telemetry: ignored.
        capture_record(2, "6/1/2024 12:00:03 AM", {"temperature": 21.5},
                       {"iothub-connection-device-id": "gw-1", "iothub-message-source": "Telemetry"},
                       body({"temperature": 21.5})),
    ]
    with open(path("capture", "0", "2024", "06", "01", "00", "00", "00.avro"), "wb") as f:
        writer(f, CAPTURE, first, codec="null")

    second = [
        capture_record(3, "6/1/2024 12:05:00 AM",
                       app("gw-1", "updateTwin", "twinChangeNotification",
                           "2024-06-01T00:05:00.1234567Z", module="azureiotsecurity"),
                       {"iothub-connection-device-id": "gw-1", "iothub-connection-module-id": "azureiotsecurity",
                        "iothub-message-source": "twinChangeEvents"},
                       body({"version": 3, "properties": {"desired": {
                           "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration": {
                               "maxMessageSizeInBytes": {"value": 10000}},
                           "$metadata": {"$lastUpdated": "2024-06-01T00:05:00.1234567Z"}, "$version": 2}}})),
        # No body: a twin change without one is a dead letter (bad_body).
        capture_record(4, "6/1/2024 12:05:01 AM",
                       app("gw-1", "updateTwin", "twinChangeNotification", "2024-06-01T00:05:01.0000000Z"),
                       {"iothub-connection-device-id": "gw-1", "iothub-message-source": "twinChangeEvents"},
                       None),
    ]
    with open(path("capture", "0", "2024", "06", "01", "00", "05", "00.avro"), "wb") as f:
        writer(f, CAPTURE, second, codec="deflate")

    with open(path("capture", "1", "2024", "06", "01", "00", "00", "00.avro"), "wb") as f:
        writer(f, CAPTURE, [], codec="null")

    # The storage route keeps storage names (connectionDeviceId, ...) and strings only; these
    # records carry no iothub-message-source: the schema property classifies them.
    storage_a = [
        {"EnqueuedTimeUtc": "2024-06-01T00:10:00.0000000Z",
         "Properties": app("gw-2", "createDeviceIdentity", "deviceLifecycleNotification",
                           "2024-06-01T00:10:00.0000000Z"),
         "SystemProperties": {"connectionDeviceId": "gw-2", "enqueuedTime": "2024-06-01T00:10:00.0000000Z",
                              "contentType": "application/json", "contentEncoding": "utf-8"},
         "Body": body({"deviceId": "gw-2", "version": 1, "tags": {"env": "dev"}})},
        {"EnqueuedTimeUtc": "2024-06-01T00:10:01.0000000Z",
         "Properties": app("gw-2", "updateTwin", "twinChangeNotification", "2024-06-01T00:10:01.0000000Z"),
         "SystemProperties": {"connectionDeviceId": "gw-2"},
         "Body": body({"version": 2, "tags": {"env": "prod", "site": "plant-7"}})},
        # An unknown opType: bad_op_type.
        {"EnqueuedTimeUtc": "2024-06-01T00:10:02.0000000Z",
         "Properties": app("gw-2", "patchTwin", "twinChangeNotification", "2024-06-01T00:10:02.0000000Z"),
         "SystemProperties": {"connectionDeviceId": "gw-2"},
         "Body": body({"version": 3})},
    ]
    with open(path("storage", "hub", "0", "2024", "06", "01", "00", "10.avro"), "wb") as f:
        writer(f, STORAGE, storage_a, codec="snappy")

    storage_b = [
        {"EnqueuedTimeUtc": "2024-06-01T00:15:00.0000000Z",
         "Properties": app("gw-1", "updateTwin", "twinChangeNotification", "2024-06-01T00:15:00.0000000Z",
                           module="azureiotsecurity"),
         "SystemProperties": {"connectionDeviceId": "gw-1", "connectionModuleId": "azureiotsecurity"},
         "Body": body({"version": 4, "properties": {"reported": {"latest": True}}})},
    ]
    with open(path("storage", "hub", "0", "2024", "06", "01", "00", "15.avro"), "wb") as f:
        writer(f, STORAGE, storage_b, codec="deflate")


if __name__ == "__main__":
    main(sys.argv[1])
