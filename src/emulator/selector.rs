//! The selector filter of a receiver link (`apache.org:selector-filter:string`), which says
//! where in the partition the receiver starts (reference `eventhubs-amqp.md` §3.4).
//!
//! Clients write `amqp.annotation.<field> <op> <value>` with field `x-opt-offset`,
//! `x-opt-sequence-number` or `x-opt-enqueued-time` (ms since the Unix epoch), op `>` or
//! `>=`, and the value quoted (`'5'`: the official Rust, Python, .NET clients) or not (`5`:
//! azeventhubs). Offset `-1` is the start of the partition and `@latest` its end.

/// The filter key clients use.
pub const SELECTOR_FILTER_KEY: &str = "apache.org:selector-filter:string";

/// Where a receiver starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// After (or at, when inclusive) an offset.
    Offset {
        offset: OffsetValue,
        inclusive: bool,
    },
    /// After (or at) a sequence number.
    SequenceNumber { value: i64, inclusive: bool },
    /// The first event enqueued after (or at) a time, ms since the Unix epoch.
    EnqueuedTime { ms: i64, inclusive: bool },
}

impl StartPosition {
    /// The start of the partition (what a receiver without a filter gets).
    pub const EARLIEST: StartPosition = StartPosition::Offset {
        offset: OffsetValue::Earliest,
        inclusive: false,
    };
}

/// The value of an offset filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetValue {
    /// `-1`: before the first event.
    Earliest,
    /// `@latest`: after the last event enqueued when the receiver attaches.
    Latest,
    /// An offset the emulator gave out (a decimal byte count).
    At(u64),
}

/// Why a selector could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector filter '{expression}': {reason}")]
pub struct SelectorError {
    /// The expression as received.
    pub expression: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a selector expression.
///
/// # Errors
///
/// [`SelectorError`] for an unknown field, an operator other than `>` and `>=`, or a value
/// that does not fit the field.
pub fn parse_selector(expression: &str) -> Result<StartPosition, SelectorError> {
    let fail = |reason| SelectorError {
        expression: expression.to_string(),
        reason,
    };
    let text = expression.trim();
    let Some(rest) = strip_prefix_ignore_case(text, "amqp.annotation.") else {
        return Err(fail("expected amqp.annotation.<field>"));
    };
    let field_end = rest
        .find(|c: char| c.is_whitespace() || c == '>' || c == '<' || c == '=')
        .ok_or_else(|| fail("expected an operator"))?;
    let (field, rest) = rest.split_at(field_end);
    let rest = rest.trim_start();
    let (inclusive, rest) = if let Some(rest) = rest.strip_prefix(">=") {
        (true, rest)
    } else if let Some(rest) = rest.strip_prefix('>') {
        (false, rest)
    } else {
        return Err(fail("the operator must be > or >="));
    };
    let value = unquote(rest.trim()).ok_or_else(|| fail("unbalanced quotes"))?;
    match field.to_ascii_lowercase().as_str() {
        "x-opt-offset" => {
            let offset = match value {
                "-1" => OffsetValue::Earliest,
                _ if value.eq_ignore_ascii_case("@latest") => OffsetValue::Latest,
                _ => OffsetValue::At(
                    value
                        .parse()
                        .map_err(|_| fail("the offset is not -1, @latest or a number"))?,
                ),
            };
            Ok(StartPosition::Offset { offset, inclusive })
        }
        "x-opt-sequence-number" => Ok(StartPosition::SequenceNumber {
            value: value
                .parse()
                .map_err(|_| fail("the sequence number is not an integer"))?,
            inclusive,
        }),
        "x-opt-enqueued-time" => Ok(StartPosition::EnqueuedTime {
            ms: value
                .parse()
                .map_err(|_| fail("the enqueued time is not an integer of milliseconds"))?,
            inclusive,
        }),
        _ => Err(fail(
            "the field must be x-opt-offset, x-opt-sequence-number or x-opt-enqueued-time",
        )),
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// The value without its single or double quotes; `None` when a quote is not closed.
fn unquote(value: &str) -> Option<&str> {
    for quote in ['\'', '"'] {
        if let Some(inner) = value.strip_prefix(quote) {
            return inner.strip_suffix(quote);
        }
    }
    (!value.ends_with(['\'', '"'])).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(expression: &str, expected: StartPosition) {
        assert_eq!(parse_selector(expression), Ok(expected), "{expression}");
    }

    #[test]
    fn offsets_quoted_and_unquoted() {
        let earliest = StartPosition::Offset {
            offset: OffsetValue::Earliest,
            inclusive: false,
        };
        check("amqp.annotation.x-opt-offset > '-1'", earliest);
        check("amqp.annotation.x-opt-offset > -1", earliest);
        let latest = StartPosition::Offset {
            offset: OffsetValue::Latest,
            inclusive: false,
        };
        check("amqp.annotation.x-opt-offset > '@latest'", latest);
        check("amqp.annotation.x-opt-offset > @latest", latest);
        check(
            "amqp.annotation.x-opt-offset >= '4096'",
            StartPosition::Offset {
                offset: OffsetValue::At(4096),
                inclusive: true,
            },
        );
        check(
            "  amqp.annotation.x-opt-offset>=4096 ",
            StartPosition::Offset {
                offset: OffsetValue::At(4096),
                inclusive: true,
            },
        );
        check(
            "amqp.annotation.x-opt-offset > \"17\"",
            StartPosition::Offset {
                offset: OffsetValue::At(17),
                inclusive: false,
            },
        );
    }

    #[test]
    fn sequence_numbers_quoted_and_unquoted() {
        for (expression, value, inclusive) in [
            ("amqp.annotation.x-opt-sequence-number > '5'", 5, false),
            ("amqp.annotation.x-opt-sequence-number >= '5'", 5, true),
            ("amqp.annotation.x-opt-sequence-number > 5", 5, false),
            ("amqp.annotation.x-opt-sequence-number >= 0", 0, true),
            ("AMQP.ANNOTATION.X-OPT-SEQUENCE-NUMBER >= '12'", 12, true),
            ("amqp.annotation.x-opt-sequence-number > '-1'", -1, false),
        ] {
            check(
                expression,
                StartPosition::SequenceNumber { value, inclusive },
            );
        }
    }

    #[test]
    fn enqueued_times_quoted_and_unquoted() {
        check(
            "amqp.annotation.x-opt-enqueued-time > '1767225600005'",
            StartPosition::EnqueuedTime {
                ms: 1_767_225_600_005,
                inclusive: false,
            },
        );
        check(
            "amqp.annotation.x-opt-enqueued-time >= 1767225600005",
            StartPosition::EnqueuedTime {
                ms: 1_767_225_600_005,
                inclusive: true,
            },
        );
    }

    #[test]
    fn rejects_what_the_service_rejects() {
        for expression in [
            "",
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-offset",
            "amqp.annotation.x-opt-offset < '1'",
            "amqp.annotation.x-opt-offset = '1'",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-offset > '12",
            "amqp.annotation.x-opt-sequence-number > 'five'",
            "amqp.annotation.x-opt-enqueued-time > '2026-01-01'",
            "amqp.annotation.x-opt-partition-key > 'a'",
        ] {
            assert!(parse_selector(expression).is_err(), "{expression}");
        }
    }
}
