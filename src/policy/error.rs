//! Load errors. A policy is checked whole: every problem of every rule of every file is
//! collected, so an operator fixes a file in one pass.

use std::fmt;

/// Every problem found while loading a policy, in file order, then rule order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// One problem, located by file, rule and place in the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file name as given to [`super::Policy::load`] or [`super::Policy::from_sources`].
    pub file: String,
    /// The rule's id, or `#n` for the n-th rule of the file (from 1) when it has no valid id;
    /// `None` for a problem with the file as a whole.
    pub rule: Option<String>,
    /// Where in the rule, as a field path such as `check.all[1].value`; empty for the rule
    /// or the file itself.
    pub at: String,
    pub problem: PolicyProblem,
}

/// What is wrong. Every variant is fatal: a policy with any problem is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error("cannot read the file: {0}")]
    Read(String),
    #[error("not valid yaml: {0}")]
    Yaml(String),
    /// A field is missing, unknown, or of the wrong YAML type.
    #[error("{0}")]
    Shape(String),
    #[error("id `{0}` does not match [a-z0-9][a-z0-9._-]*")]
    BadId(String),
    #[error("duplicate id, first defined in {0}")]
    DuplicateId(String),
    #[error("unknown severity `{0}` (expected info, low, medium, high or critical)")]
    UnknownSeverity(String),
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    #[error("{0}")]
    MissingOperand(String),
    #[error("{0}")]
    ConflictingOperand(String),
    /// An operand of the right kind for its op but unusable: not an array for `in`, an
    /// unknown type name, ...
    #[error("{0}")]
    BadOperand(String),
    #[error("bad pointer `{pointer}`: {reason}")]
    BadPointer { pointer: String, reason: String },
    #[error("bad regex `{pattern}`: {reason}")]
    BadRegex { pattern: String, reason: String },
    #[error("bad duration `{0}`: not an ISO 8601 duration PnYnMnWnDTnHnMnS (or too large)")]
    BadDuration(String),
}

impl PolicyError {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self.problem {
            PolicyProblem::Read(_) => "read",
            PolicyProblem::Yaml(_) => "yaml",
            PolicyProblem::Shape(_) => "shape",
            PolicyProblem::BadId(_) => "bad_id",
            PolicyProblem::DuplicateId(_) => "duplicate_id",
            PolicyProblem::UnknownSeverity(_) => "unknown_severity",
            PolicyProblem::UnknownOp(_) => "unknown_op",
            PolicyProblem::MissingOperand(_) => "missing_operand",
            PolicyProblem::ConflictingOperand(_) => "conflicting_operand",
            PolicyProblem::BadOperand(_) => "bad_operand",
            PolicyProblem::BadPointer { .. } => "bad_pointer",
            PolicyProblem::BadRegex { .. } => "bad_regex",
            PolicyProblem::BadDuration(_) => "bad_duration",
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = format!("{}: ", self.file);
        if let Some(rule) = &self.rule {
            line.push_str(&format!("rule {rule}: "));
        }
        if !self.at.is_empty() {
            line.push_str(&format!("{}: ", self.at));
        }
        line.push_str(&self.problem.to_string());
        // One line per error, whatever the policy text quoted in it holds.
        f.write_str(&line.replace('\n', "\\n").replace('\r', "\\r"))
    }
}

impl std::error::Error for PolicyError {}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}
