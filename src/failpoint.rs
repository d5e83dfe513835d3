//! Failpoints: named spots where the reliability suite makes the process die at a precise
//! moment (between a batch's write and the sinks' acknowledgement, say) or run slowly.
//!
//! Compiled in only with the `failpoints` cargo feature; without it [`hit`] is an empty
//! inline function. With it, the `FAILPOINTS` environment variable configures the spots in
//! the syntax of the `fail` crate, `name=[p%][count*]action[(arg)][->...]`, where the actions
//! are `off`, `sleep(ms)`, `pause` and `return`, and `return` means **die at once by
//! SIGKILL**, as a crash would: no destructor, no flush, no goodbye. For example
//! `FAILPOINTS="writer.after_write=3*off->return"` kills the process at the fourth batch
//! written.
//!
//! The spots (`NAMES`): see where each is hit for what is durable at that moment.

/// Every failpoint the code hits, in the order a message meets them.
pub const NAMES: &[&str] = &[
    // The apply thread, before it hands a batch to the writer (state, checkpoints and new
    // alerts all in the batch, nothing written).
    APPLY_BEFORE_HANDOFF,
    // The writer, before RocksDB's write of a batch.
    WRITER_BEFORE_WRITE,
    // The writer, after the batch is written (durable state, checkpoints and outbox), before
    // the apply thread or the delivery thread hears of it: between a batch write and the
    // sinks' acknowledgement.
    WRITER_AFTER_WRITE,
    // Delivery, after a sink accepted a run of alerts, before its cursor moves past the run.
    DELIVERY_AFTER_ACK,
];

/// The failpoints of whole-snapshot passes, which only a policy change or a seed pass meets.
pub const PASS_NAMES: &[&str] = &[
    // A re-audit, before it commits a batch of re-audited twins with its progress.
    REAUDIT_BEFORE_COMMIT,
    // A seed pass, after its documents (and removals) are committed, before the evaluation
    // of the twins it touched.
    SEED_BEFORE_EVALUATION,
];

/// The failpoints of grace periods (`docs/semantics.md` §9), which only runs with `for`
/// rules meet.
pub const GRACE_NAMES: &[&str] = &[
    // The apply thread, after a timer fired: a pending violation opened, its alert and the
    // violation's move from pending to open are in the open batch, nothing of it written.
    TIMER_AFTER_FIRE,
];

pub const APPLY_BEFORE_HANDOFF: &str = "apply.before_handoff";
pub const WRITER_BEFORE_WRITE: &str = "writer.before_write";
pub const WRITER_AFTER_WRITE: &str = "writer.after_write";
pub const DELIVERY_AFTER_ACK: &str = "delivery.after_ack";
pub const REAUDIT_BEFORE_COMMIT: &str = "reaudit.before_commit";
pub const SEED_BEFORE_EVALUATION: &str = "seed.before_evaluation";
pub const TIMER_AFTER_FIRE: &str = "timer.after_fire";

/// Reads `FAILPOINTS`; returns a guard to keep for the process's life.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// Passes failpoint `name`: does what `FAILPOINTS` says for it (with the `failpoints`
/// feature), nothing otherwise.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    fail::eval(name, |_| die());
}

/// Passes failpoint `name`: compiled away without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Dies by SIGKILL, as the crash the failpoint stands for.
#[cfg(feature = "failpoints")]
fn die() -> ! {
    // SAFETY: kill(2) on our own pid with a signal that cannot be caught.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL to ourselves is delivered before kill returns; abort in case it was not.
    std::process::abort()
}
