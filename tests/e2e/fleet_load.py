"""Continuous load on a fleet, and how often the fleet called one deployment.

Usage:
  python fleet_load.py load BASE_URL CLIENT_KEY CLIENTS SECONDS
      CLIENTS threads, each with one `GET /?query=` always in flight for SECONDS: as many
      requests in flight as the fleet has execution environments, never a pause between them.
      Prints {"statuses": {status: count}, "requests": n, "slowest_ms": ms} as JSON.
  python fleet_load.py windows EMULATOR_LOG DEPLOYMENT WIDTH [FROM_LINE]
      From the emulator's call log (one `deployment=NAME ... t=SECONDS` line per call), the
      calls to DEPLOYMENT after line FROM_LINE: their times, and the most that fall within any
      WIDTH seconds (a sliding window, so no boundary splits a stampede). Prints JSON.
"""

import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request


def load(base, key, clients, seconds):
    statuses, slowest = {}, [0.0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(i):
        n = 0
        while time.monotonic() < end:
            request = urllib.request.Request(
                f"{base}/?query=load-{i}-{n}", headers={"Authorization": f"Bearer {key}"}
            )
            started = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    status = str(response.status)
            except urllib.error.HTTPError as error:
                status = str(error.code)
            except Exception as error:  # a broken connection, a timeout: counted, not raised
                status = type(error).__name__
            took = (time.monotonic() - started) * 1000
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                slowest[0] = max(slowest[0], took)
            n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"statuses": statuses, "requests": sum(statuses.values()),
                      "slowest_ms": round(slowest[0], 1)}))


def windows(log, deployment, width, from_line=0):
    times = []
    with open(log) as f:
        for number, line in enumerate(f):
            if number < from_line or f"deployment={deployment} " not in line:
                continue
            found = re.search(r"\bt=([\d.]+)", line)
            if found:
                times.append(float(found.group(1)))
    times.sort()
    most = 0
    for i, start in enumerate(times):
        most = max(most, sum(1 for t in times[i:] if t < start + width))
    print(json.dumps({"calls": len(times), "most_in_a_window": most,
                      "times": [round(t - times[0], 3) for t in times] if times else []}))


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "load":
        load(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    elif command == "windows":
        windows(sys.argv[2], sys.argv[3], float(sys.argv[4]),
                int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    else:
        sys.exit(__doc__)
