"""Test counts from pytest's JUnit XML reports, for the summary of scripts/test.sh.

python3 scripts/junit_counts.py REPORT.xml            "N passed, N failed, N errors, N skipped"
python3 scripts/junit_counts.py --total REPORT.xml... "total: N passed, N failed, N skipped" (errors count as failed:
                                                      the closing line CI reads)
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter


def counts(path: str) -> Counter[str]:
    """passed / failed / errors / skipped over every test suite of one report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total: Counter[str] = Counter()
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            total[key] += int(suite.get(key, 0))
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def main(arguments: list[str]) -> None:
    if arguments[:1] == ["--total"]:
        total = sum((counts(path) for path in arguments[1:]), Counter())
        failed = total["failures"] + total["errors"]
        print(f"total: {total['passed']} passed, {failed} failed, {total['skipped']} skipped")
    else:
        (path,) = arguments
        c = counts(path)
        print(f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped")


if __name__ == "__main__":
    main(sys.argv[1:])
