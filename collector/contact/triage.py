"""The life of a submission after intake: statuses, who may move it where.

NEW → IN_PROGRESS → RESPONDED → CLOSED is the path; a closed or responded
submission can be reopened (IN_PROGRESS); any open one can be marked SPAM
and a SPAM one rescued (back to NEW). Pure rules, no storage.
"""

from __future__ import annotations

import msgspec

NEW = "NEW"
IN_PROGRESS = "IN_PROGRESS"
RESPONDED = "RESPONDED"
CLOSED = "CLOSED"
SPAM = "SPAM"
STATUSES = (NEW, IN_PROGRESS, RESPONDED, CLOSED, SPAM)

TRANSITIONS: dict[str, frozenset[str]] = {
    NEW: frozenset({IN_PROGRESS, CLOSED, SPAM}),
    IN_PROGRESS: frozenset({NEW, RESPONDED, CLOSED, SPAM}),
    RESPONDED: frozenset({IN_PROGRESS, CLOSED}),
    CLOSED: frozenset({IN_PROGRESS, SPAM}),
    SPAM: frozenset({NEW}),
}

# Statuses from which a response email may be sent (a second response to a
# RESPONDED submission is a follow-up).
RESPONDABLE = frozenset({NEW, IN_PROGRESS, RESPONDED})

MAX_ASSIGNEE = 200


class TransitionError(ValueError):
    """The requested change is not allowed from the current state."""


class ContactPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """``PATCH /v1/contact/{id}``: any of these. ``assigned_to: null`` unassigns;
    ``spam: true/false`` is shorthand for marking / rescuing."""

    status: str | None = None
    assigned_to: str | msgspec.UnsetType | None = msgspec.UNSET
    spam: bool | None = None


class Change(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    assigned_to: str | None
    rescued: bool = False


def plan_change(current_status: str, current_assignee: str | None, patch: ContactPatch) -> Change:
    """The resulting status and assignee, or TransitionError / ValueError.

    Assigning a NEW submission (without naming a status) starts work on it:
    it moves to IN_PROGRESS, as help desks do.
    """
    target = patch.status.upper() if patch.status is not None else None
    if target is not None and target not in STATUSES:
        raise ValueError(f"status: must be one of {', '.join(STATUSES)}")
    if patch.spam is not None:
        wanted = SPAM if patch.spam else NEW
        if target is not None and target != wanted:
            raise ValueError("spam and status disagree")
        if not patch.spam and current_status != SPAM:
            raise TransitionError(f"the submission is {current_status}, not SPAM")
        target = wanted
    assignee = current_assignee
    if not isinstance(patch.assigned_to, msgspec.UnsetType):
        value = patch.assigned_to.strip() if patch.assigned_to is not None else None
        if value is not None and not 0 < len(value) <= MAX_ASSIGNEE:
            raise ValueError(f"assigned_to: 1–{MAX_ASSIGNEE} characters, or null to unassign")
        assignee = value
        if target is None and value is not None and current_status == NEW:
            target = IN_PROGRESS
    status = current_status
    if target is not None and target != current_status:
        if target not in TRANSITIONS[current_status]:
            raise TransitionError(f"cannot move a {current_status} submission to {target}")
        status = target
    return Change(status=status, assigned_to=assignee, rescued=current_status == SPAM and status != SPAM)


def check_respondable(status: str) -> None:
    if status not in RESPONDABLE:
        hint = "reopen it first (status IN_PROGRESS)" if status == CLOSED else "rescue it from SPAM first"
        raise TransitionError(f"cannot respond to a {status} submission; {hint}")
