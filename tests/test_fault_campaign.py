"""The fault campaign of issue 22 (scripts/fault_campaign.py) in its --quick size: hostile manifests and listing
keys, registry promotions under injected faults and lost responses, racing writers of one artifact (local
processes and S3 threads through the faulting proxy), and a silent endpoint. It must finish with nothing wrong
and no tracebacks, and really inject the faults it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.s3
def test_fault_campaign_quick(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    res = subprocess.run(
        [sys.executable, "scripts/fault_campaign.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    figures = json.loads(out.read_text())
    for name in ("hostile", "registry", "race", "hang"):
        f = figures[name]
        assert f["trials"] > 0 and f["faults_injected"] > 0, (name, f)
        assert (f["wrong"], f["tracebacks"]) == (0, 0), (name, f)
    assert (
        figures["hostile"]["accepted"] == 0 and figures["hostile"]["refused"] == figures["hostile"]["trials"]
    )
    assert figures["hang"]["refused"] == figures["hang"]["trials"]
    assert figures["registry"]["lost_responses"] + figures["registry"]["proxy_faults"] > 0
    assert figures["race"]["reader_accepted"] > 0  # the reader saw complete artifacts during the races
    for line in ("hostile", "registry", "race", "hang", "trials", "refused", "accepted", "tracebacks"):
        assert line in res.stdout
