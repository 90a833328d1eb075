"""The verdict of the common model tests: `python -m tests.conformance.summary JUNIT_XML`.

Counts passed / failed / skipped per test class (`tests/conformance/common.py`), lists every test whose outcome on a
MatGPT2 class differs from stock GPT-2's, and the skip reasons with how many tests each skips. Exits 1 when a test that
passes on GPT-2 does not pass on a MatGPT2 class, or anything fails.
"""

import collections
import sys
import xml.etree.ElementTree as ET


REFERENCE = "GPT2CommonTest"


def outcomes(junit_xml: str) -> tuple[dict[str, dict[str, str]], dict[str, collections.Counter]]:
    """Per test class: test name -> passed | failed | skipped, and the skip messages counted."""
    by_class: dict[str, dict[str, str]] = collections.defaultdict(dict)
    reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        test_class = case.get("classname").rsplit(".", 1)[-1]
        skipped = case.find("skipped")
        failed = case.find("failure") is not None or case.find("error") is not None
        by_class[test_class][case.get("name")] = "skipped" if skipped is not None else "failed" if failed else "passed"
        if skipped is not None:
            reasons[test_class][skipped.get("message", "").removeprefix("Skipped: ")] += 1
    return by_class, reasons


def main(junit_xml: str) -> int:
    by_class, reasons = outcomes(junit_xml)
    reference = by_class[REFERENCE]
    worse = 0
    print(f"{'test class':28} passed failed skipped  differs from {REFERENCE}")
    for test_class, results in by_class.items():
        if not test_class.endswith("CommonTest"):
            continue
        counts = collections.Counter(results.values())
        differs = {name: (reference.get(name), outcome) for name, outcome in results.items()
                   if reference.get(name) != outcome}  # fmt: skip
        worse += counts["failed"] + sum(was == "passed" for was, _ in differs.values())
        print(f"{test_class:28} {counts['passed']:6} {counts['failed']:6} {counts['skipped']:7}  {differs or 'no'}")
    print(f"\nskip reasons ({REFERENCE}; every class skips the same tests unless listed above):")
    for reason, count in reasons[REFERENCE].most_common():
        print(f"  {count:3}  {reason}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
