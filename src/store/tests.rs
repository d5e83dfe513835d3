use super::*;

/// Outbox entries carry their commit time; entries written before it was recorded (the
/// alert alone) are still read, without one. Per-sink cursors round-trip, and a range
/// deletion takes exactly the entries below its end.
#[test]
fn outbox_entries_carry_their_commit_time_and_old_entries_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let mut batch = Batch::default();
    store
        .put_outbox(&mut batch, 1, b"{\"id\":\"new\"}")
        .expect("put");
    store.write(&mut batch).expect("write");
    // The old format: the alert alone.
    store
        .db
        .put_cf(
            store.cf(CF_OUTBOX).expect("cf"),
            outbox_key(0),
            b"{\"id\":\"old\"}",
        )
        .expect("put");
    let entries = store.outbox_entries(0, 10).expect("read");
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].seq, entries[0].committed_ms), (0, None));
    assert_eq!(entries[0].alert, b"{\"id\":\"old\"}");
    assert_eq!(entries[1].alert, b"{\"id\":\"new\"}");
    let at = entries[1].committed_ms.expect("a commit time");
    assert!(at >= before && at < before + 60_000, "{at} vs {before}");
    let plain = store.outbox_from(0, 10).expect("read");
    assert_eq!(plain[1], (1, b"{\"id\":\"new\"}".to_vec()));

    assert_eq!(store.sink_cursor("webhook").expect("cursor"), None);
    let mut batch = Batch::default();
    store
        .put_sink_cursor(&mut batch, "webhook", 1)
        .expect("put");
    store.delete_outbox_range(&mut batch, 0, 1).expect("delete");
    store.write(&mut batch).expect("write");
    assert_eq!(store.sink_cursor("webhook").expect("cursor"), Some(1));
    assert_eq!(store.sink_cursor("file").expect("cursor"), None);
    let left: Vec<u64> = store
        .outbox_entries(0, 10)
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [1]);
}

/// A directory written before the alert dead letters' column family existed opens
/// read-only (it has none) and gets the family at the next read-write open.
#[test]
fn a_directory_without_the_alert_dead_letter_family_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let old: Vec<&str> = ALL_CFS
            .iter()
            .copied()
            .filter(|name| *name != CF_ALERT_DEAD_LETTERS)
            .collect();
        let db = DB::open_cf(&options, dir.path(), old).expect("create");
        db.put_cf(db.cf_handle(CF_META).expect("meta"), META_FORMAT, FORMAT)
            .expect("format");
    }
    let reader = Store::open_read_only(dir.path()).expect("read-only open");
    assert_eq!(reader.alert_dead_letters().expect("read").count(), 0);
    drop(reader);
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
    let mut batch = Batch::default();
    store
        .put_alert_dead_letter(&mut batch, 7, "webhook", b"{}")
        .expect("put");
    store.write(&mut batch).expect("write");
    let letters: Vec<Vec<u8>> = store
        .alert_dead_letters()
        .expect("read")
        .collect::<Result<_, _>>()
        .expect("read");
    assert_eq!(letters, [b"{}".to_vec()]);
}

/// A data directory of another (say a newer) format is refused, by the writer and by the
/// readers, with both formats named; nothing in it is changed.
#[test]
fn a_directory_of_another_format_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
        let meta = store.cf(CF_META).expect("meta");
        store
            .db
            .put_cf(meta, META_FORMAT, "twinwatch-snapshot-2")
            .expect("put");
    }
    let refused = |result: Result<Store, StoreError>| {
        let Err(error) = result else {
            panic!("a directory of another format was opened");
        };
        assert_eq!(error.kind(), "format");
        let text = error.to_string();
        assert!(
            text.contains("twinwatch-snapshot-2") && text.contains(FORMAT),
            "{text}"
        );
    };
    refused(Store::open(dir.path(), &StoreOptions::default()));
    // Refused again: the writer's attempt left the marker as it was.
    refused(Store::open_read_only(dir.path()));
}

#[test]
fn waiting_for_space_gives_up_when_told_to_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
    assert!(store.wait_for_space(0).is_ok());
    assert_eq!(store.space_problem(), None);
    store.stop_waiting();
    let error = store
        .wait_for_space(u64::MAX)
        .expect_err("no disk is that large");
    assert_eq!(error.kind(), "no_space");
    assert!(store
        .space_problem()
        .is_some_and(|p| p.contains("disk is full")));
}
