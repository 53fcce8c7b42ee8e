"""`make demo`: build a sample app into a signed release, verify it, publish it.

Runs the real `otad-release` commands a CI job would run, printing each one,
in a temporary folder that is removed afterwards (set DEMO_KEEP=1 to keep it).
Later stages of the demo (a whole local fleet) grow from here.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE_APP = {
    "bin/robot-app": "#!/bin/sh\necho \"robot-app $(cat \"$(dirname \"$0\")/../VERSION\")\"\n",
    "selftest": "#!/bin/sh\n# A release's own self-test: the robot runs it after activation.\nexec \"$(dirname \"$0\")/bin/robot-app\" >/dev/null\n",
    "share/config.json": '{"speed_limit_mps": 1.5}\n',
}


def _step(title: str, argv: list[str], env: dict[str, str]) -> str:
    print(f"\n== {title}\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    output = (result.stdout + result.stderr).strip()
    if output:
        print(output)
    if result.returncode != 0:
        raise SystemExit(f"demo: step failed: {title}")
    return output


def _write_app(root: Path, version: str) -> None:
    for rel, text in SAMPLE_APP.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel in ("bin/robot-app", "selftest"):
        (root / rel).chmod(0o755)
    (root / "VERSION").write_text(version + "\n")


def main() -> int:
    bin_dir = Path(sys.executable).parent
    repo = Path(__file__).resolve().parents[2]
    work = Path(tempfile.mkdtemp(prefix="otad-demo-"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "COSIGN_PASSWORD": "demo"}
    release = str(bin_dir / "otad-release")
    try:
        print(f"otad demo: building a signed release of a sample robot app in {work}")
        app, out, ota = work / "app", work / "out", work / "ota"
        _write_app(app, "1.0.0")
        _step("generate a cosign-compatible signing key", [release, "keygen", "--output-prefix", str(work / "demo")], env)
        env["COSIGN_KEY"] = str(work / "demo.key")
        _step("CI: build, sign, verify and publish (ci/build-release)", [str(repo / "ci" / "build-release"), str(app), str(out), str(ota)], env)
        _step("gateway/robot view: verify the published release offline", [release, "verify", "--key", str(work / "demo.pub"), "--manifest", str(ota / "manifest.json")], env)
        tampered = work / "tampered.tar.gz"
        data = bytearray((ota / "app-v1.0.0.tar.gz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        tampered.write_bytes(bytes(data))
        print("\n== a tampered copy (one byte flipped) must be refused")
        check = subprocess.run(
            [release, "verify", "--key", str(work / "demo.pub"), "--bundle", str(ota / "app-v1.0.0.tar.gz.bundle"), str(tampered)],
            env=env, capture_output=True, text=True,
        )
        print(check.stderr.strip() or check.stdout.strip())
        if check.returncode != 1:
            raise SystemExit("demo: a tampered artifact was not refused")
        print("\n== what the dashboard's OTA folder now holds")
        for path in sorted(ota.iterdir()):
            print(f"  {path.name:32} {path.stat().st_size:>8} bytes")
        print("\n" + (ota / "manifest.json").read_text())
        print("demo: OK")
        return 0
    finally:
        if os.environ.get("DEMO_KEEP") == "1":
            print(f"demo: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
