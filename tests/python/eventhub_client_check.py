"""Reads an Event Hubs endpoint with Microsoft's official Python client (azure-eventhub) and
prints what it saw as one JSON document, for the emulator's test to compare with what it
preloaded.

Usage: eventhub_client_check.py CONNECTION_STRING START_SEQUENCE_NUMBER [TIMEOUT_SECONDS]

Output:
{"eventhub": {"name", "partition_ids"},
 "partitions": {"<id>": {"properties": {...}, "events": [...], "errors": [...]}}}
where each partition's events are those from START_SEQUENCE_NUMBER (inclusive) to the last
enqueued one, each with its sequence number, offset, enqueued time (ms), body (base64),
application properties, message annotations and AMQP properties.
"""

import asyncio
import base64
import json
import sys

from azure.eventhub.aio import EventHubConsumerClient


def text(value):
    """AMQP strings and symbols arrive as bytes from the pure-Python AMQP stack."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return value


def annotation(value):
    if isinstance(value, (bytes, bytearray)):
        return {"string": text(value)}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    return {"other": repr(value)}


def describe(event):
    raw = event.raw_amqp_message
    body = b"".join(bytes(section) for section in raw.body)
    amqp_properties = {}
    if raw.properties is not None:
        for name in ("message_id", "user_id", "content_type", "content_encoding", "correlation_id"):
            value = getattr(raw.properties, name, None)
            if value is not None:
                amqp_properties[name] = text(value)
    return {
        "sequence_number": event.sequence_number,
        "offset": event.offset,
        "enqueued_time_ms": round(event.enqueued_time.timestamp() * 1000) if event.enqueued_time else None,
        "body_base64": base64.b64encode(body).decode("ascii"),
        "properties": {text(k): text(v) for k, v in (event.properties or {}).items()},
        "annotations": {text(k): annotation(v) for k, v in (raw.annotations or {}).items()},
        "amqp_properties": amqp_properties,
    }


async def read_partition(connection_string, partition_id, start, expected, timeout):
    client = EventHubConsumerClient.from_connection_string(connection_string, consumer_group="$Default")
    events, errors = [], []
    done = asyncio.Event()

    async def on_event(_context, event):
        if event is None:
            return
        events.append(describe(event))
        if len(events) >= expected:
            done.set()

    async def on_error(_context, error):
        errors.append(repr(error))

    receiving = asyncio.create_task(
        client.receive(
            on_event,
            partition_id=partition_id,
            starting_position=start,
            starting_position_inclusive=True,
            on_error=on_error,
            max_wait_time=None,
        )
    )
    if expected > 0:
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            errors.append(f"timed out after {timeout}s with {len(events)} of {expected} events")
    await client.close()
    # The async client's receive loop can take half a minute to notice the close; what it
    # received is all in `events` by now, so stop it instead of waiting.
    receiving.cancel()
    try:
        await receiving
    except asyncio.CancelledError:
        pass
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        errors.append(f"receive ended with {error!r}")
    return events, errors


async def main():
    connection_string = sys.argv[1]
    start = int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    client = EventHubConsumerClient.from_connection_string(connection_string, consumer_group="$Default")
    async with client:
        hub = await client.get_eventhub_properties()
        partitions = {}
        for partition_id in hub["partition_ids"]:
            properties = await client.get_partition_properties(partition_id)
            partitions[partition_id] = {
                "properties": {
                    "eventhub_name": properties["eventhub_name"],
                    "id": properties["id"],
                    "beginning_sequence_number": properties["beginning_sequence_number"],
                    "last_enqueued_sequence_number": properties["last_enqueued_sequence_number"],
                    "last_enqueued_offset": properties["last_enqueued_offset"],
                    "last_enqueued_time_ms": round(properties["last_enqueued_time_utc"].timestamp() * 1000),
                    "is_empty": properties["is_empty"],
                }
            }
    # Every partition at once, each with a client of its own, as consumers read a hub (and
    # in a quarter of the time: a client's receive and close take about a second each).
    readings = await asyncio.gather(*(
        read_partition(
            connection_string,
            partition_id,
            start,
            max(0, entry["properties"]["last_enqueued_sequence_number"] - start + 1),
            timeout,
        )
        for partition_id, entry in partitions.items()
    ))
    for entry, (events, errors) in zip(partitions.values(), readings):
        entry["events"] = events
        entry["errors"] = errors
    print(json.dumps({
        "eventhub": {"name": hub["eventhub_name"], "partition_ids": hub["partition_ids"]},
        "partitions": partitions,
    }))


if __name__ == "__main__":
    asyncio.run(main())
