//! Avro containers: each input is a whole file, read by the fast reader (Capture and
//! storage-route schemas) and by the generic one (any schema), as replay reads them; each
//! record is decoded as the engine decodes it, every time parser included (the Event Hubs
//! enqueued time is read as the engine reads it when a sink is configured). Any panic, and
//! any allocation far beyond the input (a block or a snappy length that lies), is a defect:
//! a bad file must end as an error at its position.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinwatch::decode::{decode_header, Message, Prop};
use twinwatch::source::avro::{AvroFile, RecordMessage};
use twinwatch::source::avro_fast::FastAvroFile;

const MAX_BODY: usize = 256 * 1024;

fn decode(record: &twinwatch::source::avro::OwnedMessage, bodies: &[u8]) {
    let body_bytes = record
        .body
        .and_then(|(start, end)| bodies.get(start as usize..end as usize))
        .unwrap_or(&[]);
    let message = RecordMessage {
        record,
        body_bytes,
        body_nodes: None,
        body_verdict: None,
    };
    let _ = message.eventhubs_enqueued_time().and_then(Prop::time);
    let _ = decode_header(&message, MAX_BODY);
    let _ = message.raw();
}

fuzz_target!(|data: &[u8]| {
    let mut bodies = Vec::new();
    if let Ok(Some(mut file)) = FastAvroFile::open(data) {
        while let Some(Ok(record)) = file.next_record(&mut bodies) {
            decode(&record, &bodies);
        }
    }
    bodies.clear();
    if let Ok(mut file) = AvroFile::open(data) {
        while let Some(Ok(record)) = file.next_record(&mut bodies) {
            decode(&record, &bodies);
        }
    }
});
