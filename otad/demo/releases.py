"""The demo's CI: a sample robot app, built, signed, verified and published with the real tools.

`ci/build-release` (the script a CI job runs) when the demo runs from a
checkout, else the same three `otad-release` commands it runs. The key is a
cosign-compatible pair the demo generates with `otad-release keygen`.
"""
from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
from pathlib import Path

from otad.demo.procs import BIN
from otad.trust.manifest import Manifest, parse_manifest

REPO = Path(__file__).resolve().parents[2]
BUILD_RELEASE = REPO / "ci" / "build-release"
DATA_BYTES = 3 * 1024 * 1024  # incompressible, so a download is long enough to watch on the site network
GOOD_SELFTEST = "#!/bin/sh\n# The release's own self-test; otad-robot runs it after activation.\nexec \"$(dirname \"$0\")/bin/robot-app\" >/dev/null\n"
BAD_SELFTEST = "#!/bin/sh\necho 'arm calibration failed: joint 3 out of range' >&2\nexit 1\n"


class StepFailed(Exception):
    pass


def run(argv: list[str], env: dict[str, str], echo: bool = True) -> str:
    """Run a CI command in its own process group; on any way out, nothing of it survives."""
    if echo:
        print(f"  $ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    if proc.returncode != 0:
        raise StepFailed(f"{os.path.basename(argv[0])} failed (exit {proc.returncode}): {output.strip()[-500:]}")
    return output


def generate_key(prefix: Path, env: dict[str, str]) -> tuple[Path, Path]:
    run([str(BIN / "otad-release"), "keygen", "--output-prefix", str(prefix)], env)
    return prefix.with_suffix(".key"), prefix.with_suffix(".pub")


def write_app(root: Path, version: str, selftest_passes: bool) -> Path:
    files = {
        "bin/robot-app": "#!/bin/sh\necho \"robot-app $(cat \"$(dirname \"$0\")/../VERSION\")\"\n",
        "selftest": GOOD_SELFTEST if selftest_passes else BAD_SELFTEST,
        "share/config.json": '{"speed_limit_mps": 1.5}\n',
        "VERSION": version + "\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel in ("bin/robot-app", "selftest"):
        (root / rel).chmod(0o755)
    (root / "share" / "model.bin").write_bytes(random.Random(version).randbytes(DATA_BYTES))
    return root


def build_and_publish(work: Path, version: str, selftest_passes: bool, key: Path, ota: Path,
                      env: dict[str, str]) -> Manifest:
    """Build, sign, verify, publish; returns the published manifest as the robots will read it."""
    app = write_app(work / f"app-{version}", version, selftest_passes)
    out = work / f"out-{version}"
    env = {**env, "COSIGN_KEY": str(key), "OTAD_RELEASE": str(BIN / "otad-release")}
    if BUILD_RELEASE.is_file():
        run(["sh", str(BUILD_RELEASE), str(app), str(out), str(ota)], env)
    else:  # an installed otad without its checkout: the same steps by hand
        release = str(BIN / "otad-release")
        run([release, "build", "--app-dir", str(app), "--version", version, "--key", str(key), "--out", str(out)], env)
        run([release, "verify", "--key", str(key.with_suffix(".pub")), "--manifest", str(out / "manifest.json")], env)
        run([release, "publish", "--from", str(out), "--to", str(ota)], env)
    return parse_manifest((out / "manifest.json").read_bytes())
