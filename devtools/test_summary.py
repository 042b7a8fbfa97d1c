"""The closing line of ``make test``: the counts of each pytest run (from their JUnit XML files) and their total.

hiddenswitch's ComfyUI logs over pytest's own closing summary when a server runs in the test process, so the counts
are read from ``--junitxml`` rather than from the output."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def counts(path: str) -> dict:
    suites = ET.parse(path).getroot()
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ([suites] if suites.tag == "testsuite" else list(suites)):
        for k in out:
            out[k] += int(suite.get(k, 0))
    return out


def main(paths) -> int:
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for path in paths:
        c = counts(path)
        failed = c["failures"] + c["errors"]
        passed = c["tests"] - failed - c["skipped"]
        print(f"{path}: {passed} passed, {failed} failed, {c['skipped']} skipped")
        total = {"passed": total["passed"] + passed, "failed": total["failed"] + failed,
                 "skipped": total["skipped"] + c["skipped"]}
    print(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
