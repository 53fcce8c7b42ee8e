"""`make demo` runs the whole release story and says OK; a tampered copy is refused on the way."""
import subprocess
import sys


def test_demo_runs_end_to_end():
    result = subprocess.run([sys.executable, "-m", "otad.demo"], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified app-v1.0.0.tar.gz" in result.stdout
    assert "bundle messageDigest does not match" in result.stdout
    assert result.stdout.strip().endswith("demo: OK")
