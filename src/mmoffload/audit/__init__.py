"""`mmoffload audit`: decode every artifact of a run or JSONL files and count every inconsistency."""

from mmoffload.audit.plan import binary_artifacts
from mmoffload.audit.report import (
    FIGURES,
    OPERATORS,
    AuditReport,
    Expectation,
    Violation,
    check_expectations,
    parse_expectation,
)
from mmoffload.audit.stage import audit, audit_record

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
