import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "256 fast tokens" in out and "512 slow tokens" in out
    assert len(out.splitlines()[-1].split(",")) == 8  # eight generated ids
