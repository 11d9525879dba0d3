"""Extra redaction detectors for the tests of ``TURNFLEET_REDACT_DETECTORS``.

``employee_ids`` is what a team would write: a pattern with a cheap gate. ``nicknames`` stands
in for an external recogniser (Presidio, a spaCy model): a plain function over the text,
wrapped so that it leaves the built-in detectors' markers alone.
"""

from __future__ import annotations

import re

from turnfleet.redaction import Detector, outside_markers

EMPLOYEE = re.compile(r"EMP(?<![\w\]]EMP)-[0-9]{6}(?![\w\-])")
NICKNAMES = ("Dana Whitfield", "Captain Refund")


def employee_ids() -> Detector:
    return Detector("employee-id", "employee", EMPLOYEE, ("EMP-",))


def _names(text: str) -> str:
    for name in NICKNAMES:
        text = text.replace(name, "[REDACTED:person]")
    return text


def recognisers() -> list[Detector]:
    return [employee_ids(),
            Detector("nicknames", "person", None, (), scan=outside_markers(_names))]


def not_detectors() -> list[str]:
    return ["EMP-"]
