"""`mmoffload audit`: decode every artifact of a run or JSONL files and count every inconsistency."""

from mmoffload.audit.stage import (
    FIGURES,
    OPERATORS,
    AuditReport,
    Expectation,
    Violation,
    audit,
    audit_record,
    binary_artifacts,
    check_expectations,
    parse_expectation,
)

__all__ = [
    "FIGURES",
    "OPERATORS",
    "AuditReport",
    "Expectation",
    "Violation",
    "audit",
    "audit_record",
    "binary_artifacts",
    "check_expectations",
    "parse_expectation",
]
