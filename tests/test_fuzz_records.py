"""The fuzz layer's files: thousands of seeded mutations of every record and generator file Retrace reads (flipped
bytes, truncation, spliced garbage, edited safetensors headers, metadata and constructor arguments). Each load
either succeeds or is refused with a ValueError naming the file; nothing else escapes, and the whole run raises the
process's peak memory by no more than a hostile file may cost."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz

SCRIPT = Path(__file__).with_name("fuzz_records.py")
SEED = int(os.environ.get("RETRACE_FUZZ_SEED", "20261207"))  # another seed: other cases
RECORD_CASES, GENERATOR_CASES = 3000, 1500
# A few MB per hostile file is the target; every case's file is at most the 600 KB seed generator, read once, so
# the run may lift the peak by the seeds' tensors and the allocator's slack, not by what any file claims.
PEAK_RISE_MIB = 64


def test_mutated_files_load_or_are_refused_naming_the_file() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), str(SEED), str(RECORD_CASES), str(GENERATOR_CASES)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    logging.getLogger("retrace.fuzz").warning("fuzz records: %s", json.dumps(report))
    assert report["cases"] == RECORD_CASES + GENERATOR_CASES
    assert report["crash_count"] == 0, json.dumps(report["crashes"], indent=1)
    outcomes = report["outcomes"]
    for group in ("record", "generator"):  # the mutations reach both ends: some files survive, most are refused
        assert outcomes.get(f"{group}:loaded", 0) > 0 and outcomes.get(f"{group}:refused", 0) > 0, outcomes
    if not math.isnan(report["peak_rise_mib"]):
        assert report["peak_rise_mib"] < PEAK_RISE_MIB, report
