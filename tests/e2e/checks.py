"""The checks of an end-to-end client: `@check("what holds")` runs the function at once and
prints `ok`/`FAIL` (with the traceback) and goes on; `finish()` prints "N passed, N failed" and
exits non-zero on any failure. Shared by the scripts in tests/e2e/."""

import sys
import traceback

results = []


def check(name):
    def run(fn):
        try:
            fn()
            results.append(True)
            print(f"ok   {name}")
        except Exception:  # report every failure, then go on
            results.append(False)
            print(f"FAIL {name}")
            traceback.print_exc()
        return fn

    return run


def finish():
    passed = sum(results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
