"""Privacy audit of the split: how much of a user's history can the server recover at each cut k?

See docs/privacy_audit.md. Library entry point: :func:`run_audit`; CLI: ``python -m fellrec_flwr.audit``.
"""

from fellrec_flwr.audit.attacks import COLUMNS, AuditSettings, run_audit
from fellrec_flwr.audit.sequences import AuditError

__all__ = ["COLUMNS", "AuditError", "AuditSettings", "run_audit"]
