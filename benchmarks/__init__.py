"""Performance benchmarks: run each as `python -m benchmarks.<name>` from the repository root."""

import os

# The 1-minute load average when a script starts, read before it imports torch and builds its model
# (seconds of its own start-up that the load average would count against `--max-load`).
STARTUP_LOAD = os.getloadavg()[0]
