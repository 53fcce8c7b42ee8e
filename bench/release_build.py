#!/usr/bin/env python3
"""Benchmark `otad-release build` against `tar czf` + `sha256sum`.

A measurement, not a test: it always exits 0 (unless it cannot run at all) and
prints PASS/MISS against two targets:

* wall clock: otad build <= 1.3 x (`tar czf OUT -C APP .` then `sha256sum OUT`);
* peak RSS of the otad process < 60 MiB, and flat whatever the artifact size
  (measured at --size-mb and at --small-mb).

The app folder is generated in a temporary folder under /tmp from a fixed seed,
so every run packages the same bytes. Run it as

    .venv/bin/python bench/release_build.py [--size-mb 256] [--repeat 3]

See docs/benchmarks.md for the figures and how to read them.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
CHUNK = 1 << 20

RATIO_TARGET = 1.3
RSS_TARGET_MIB = 60.0
# "Flat": the big build may use at most this much more than the small one.
RSS_FLAT_SLACK_MIB = 4.0

# Share of the bytes per kind of content (see make_app and docs/benchmarks.md).
MIX = (
    ("random", 0.35),  # already compressed: images, media, .gz/.zip, model blobs
    ("text", 0.40),  # source, JSON/YAML config, docs, logs
    ("binary", 0.25),  # executables, shared libraries, data tables: compressible binary
)
EXTENSIONS = {
    "random": (".png", ".jpg", ".ogg", ".gz", ".onnx"),
    "text": (".py", ".json", ".yaml", ".md", ".launch", ".csv"),
    "binary": (".so", ".bin", ".dat", ""),
}
DEFAULT_FILES = 320
DIR_NAMES = ("lib", "share", "config", "models", "assets", "launch", "maps", "nodes", "msg", "scripts", "data", "ui")


# --------------------------------------------------------------------------- data


def _word_pool(rng: random.Random, count: int) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkjqxz_"
    weights = [27, 20, 18, 17, 16, 15, 14, 13, 11, 10, 8, 8, 7, 6, 6, 5, 5, 4, 3, 3, 3, 2, 1, 1, 1, 1, 4]
    keywords = ["def", "return", "self", "import", "for", "in", "if", "else", "None", "True", "false", "null",
                "robot", "topic", "frame", "joint", "pose", "value", "name", "type", "id", "data", "the", "a"]
    words = list(keywords)
    while len(words) < count:
        words.append("".join(rng.choices(letters, weights, k=rng.randint(2, 11))))
    return words


def _line_pool(rng: random.Random, count: int) -> list[bytes]:
    """Source-, config- and log-like lines from a Zipf-weighted vocabulary.

    Tuned so that gzip -6 gets about 3.6x at about 33 MiB/s, close to real
    Python sources (4x at 42 MiB/s on this machine), slightly pessimistic.
    """
    words = _word_pool(rng, 1500)
    zipf = [1 / (i + 1) ** 1.2 for i in range(len(words))]
    lines = []
    for _ in range(count):
        shape = rng.random()
        picks = rng.choices(words, zipf, k=rng.randint(2, 10))
        indent = " " * (4 * rng.randint(0, 3))
        if shape < 0.4:
            line = f"{indent}{picks[0]} = {'.'.join(picks[1:3])}({', '.join(picks[3:])})"
        elif shape < 0.65:
            line = f'{indent}"{picks[0]}": {rng.randint(0, 10 ** rng.randint(1, 4))},  "{picks[1]}": "{" ".join(picks[2:])}"'
        elif shape < 0.8:
            stamp = f"2025-03-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
            line = f"{stamp} {rng.choice(('INFO', 'WARN', 'DEBUG', 'ERROR'))} [{picks[0]}] {' '.join(picks[1:])}"
        else:
            line = f"{indent}# {' '.join(picks)}"
        lines.append((line + "\n").encode("ascii"))
    return lines


def _binary_pool(rng: random.Random, size: int) -> bytes:
    """Machine-code-like bytes: short Zipf-weighted byte sequences ("instructions").

    gzip -6 gets about 2.4x at about 29 MiB/s, like a real shared library
    (libcrypto.so.3: 2.5x at 30 MiB/s on this machine).
    """
    low = bytes(0 if b < 48 else b for b in range(256))
    tokens = [rng.randbytes(rng.choice((1, 2, 2, 3, 3, 4, 5, 6, 7, 8))).translate(low) for _ in range(2000)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(tokens))))
    parts: list[bytes] = []
    have = 0
    while have < size:
        block = b"".join(rng.choices(tokens, cum_weights=cum, k=65536))
        parts.append(block)
        have += len(block)
    return b"".join(parts)[:size]


@dataclass(frozen=True)
class AppStats:
    files: int
    dirs: int
    total_bytes: int
    by_kind: dict[str, tuple[int, int]]  # kind -> (files, bytes)


def _write_random(rng: random.Random, out, size: int) -> None:
    while size > 0:
        n = min(size, CHUNK)
        out.write(rng.randbytes(n))
        size -= n


def _write_binary(rng: random.Random, out, size: int, pool: bytes) -> None:
    # Segments of at least 64 KiB at random offsets of the pool: longer than
    # deflate's 32 KiB window, so gzip sees them as fresh data.
    while size > 0:
        n = min(size, rng.randint(64 * 1024, 512 * 1024))
        start = rng.randrange(len(pool) - n + 1)
        out.write(pool[start:start + n])
        size -= n


def _write_text(rng: random.Random, out, size: int, lines: list[bytes]) -> None:
    while size > 0:
        chunk = b"".join(rng.choices(lines, k=CHUNK // 60))
        piece = chunk[:size]
        out.write(piece)
        size -= len(piece)


def make_app(root: Path, size_bytes: int, seed: int, file_count: int = DEFAULT_FILES) -> AppStats:
    """Generate a deterministic app folder of about size_bytes under root."""
    rng = random.Random(seed)
    lines = _line_pool(random.Random(seed + 1), 4000)
    pool = _binary_pool(random.Random(seed + 2), 8 * MIB)
    root.mkdir(parents=True)

    # Nested folders: a few top-level trees, 1 to 4 levels deep.
    dirs = [Path(".")]
    for i in range(40):
        parent = rng.choice(dirs) if len(dirs) > 1 and rng.random() < 0.7 else Path(".")
        if len(parent.parts) >= 4:
            parent = parent.parent
        dirs.append(parent / f"{rng.choice(DIR_NAMES)}{i}")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)

    # Per kind, a share of the files and of the bytes; sizes log-normal (many small, a few big).
    plan: list[tuple[str, int]] = []
    for kind, share in MIX:
        count = max(1, round(file_count * {"random": 0.2, "text": 0.55, "binary": 0.25}[kind]))
        weights = [rng.lognormvariate(0, 1.6) for _ in range(count)]
        budget = int(size_bytes * share)
        total_w = sum(weights)
        sizes = [int(budget * w / total_w) for w in weights]
        sizes[0] += budget - sum(sizes)
        plan.extend((kind, s) for s in sizes)
    rng.shuffle(plan)

    by_kind = {kind: (0, 0) for kind, _ in MIX}
    for index, (kind, size) in enumerate(plan):
        rel = rng.choice(dirs) / f"f{index:04d}{rng.choice(EXTENSIONS[kind])}"
        path = root / rel
        with open(path, "wb") as out:
            if kind == "random":
                _write_random(rng, out, size)
            elif kind == "binary":
                _write_binary(rng, out, size, pool)
            else:
                _write_text(rng, out, size, lines)
        if kind == "binary" and rng.random() < 0.3:
            path.chmod(0o755)
        files, nbytes = by_kind[kind]
        by_kind[kind] = (files + 1, nbytes + size)
    # One relative symlink, as apps ship them (e.g. lib/libfoo.so -> libfoo.so.1).
    os.symlink(os.path.relpath(path, root / dirs[0]), root / dirs[0] / "current")
    return AppStats(files=len(plan), dirs=len(dirs) - 1, total_bytes=sum(s for _, s in plan), by_kind=by_kind)


def make_app_in_child(root: Path, size_bytes: int, seed: int) -> AppStats:
    """make_app in a forked child, so that this process stays small.

    This process's resident size is the floor of every child's measured peak
    RSS (see spawn), so the generator's buffers must not live here.
    """
    result = root.with_name(root.name + ".stats.json")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            stats = make_app(root, size_bytes, seed)
            result.write_text(json.dumps(dataclasses.asdict(stats)))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"generating the app folder {root} failed")
    doc = json.loads(result.read_text())
    result.unlink()
    return AppStats(doc["files"], doc["dirs"], doc["total_bytes"], {k: tuple(v) for k, v in doc["by_kind"].items()})


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    seconds: float
    max_rss_kib: int
    artifact_bytes: int


def _otad_release() -> str:
    beside = Path(sys.executable).with_name("otad-release")
    if beside.exists():
        return str(beside)
    found = shutil.which("otad-release")
    if not found:
        sys.exit("otad-release not found: run with the project's venv, e.g. .venv/bin/python bench/release_build.py")
    return found


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, int]:
    """Run argv, wait for it with wait4; return (exit status, wall seconds, peak RSS KiB).

    fork + exec by hand rather than subprocess: subprocess uses vfork, and on
    Linux a vforked child that execs inherits its parent's RSS high-water mark
    in ru_maxrss, so a child would be reported at least as big as this script
    at its peak (the app generator). A forked child only starts from the pages
    this script has resident at the moment of the fork (the "spawn floor"
    printed at the start), which exec then drops.
    """
    with open(log, "ab") as out, open(os.devnull, "rb") as null:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child: only async-signal-safe-ish work until exec
            try:
                os.dup2(null.fileno(), 0)
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                os.execvpe(argv[0], argv, env if env is not None else os.environ)
            finally:
                os._exit(127)
        _, status, usage = os.wait4(pid, 0)
        elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        sys.exit(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed with exit status {code}")
    return code, elapsed, usage.ru_maxrss


def run_reference(app: Path, out_dir: Path, log: Path) -> Run:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir()
    artifact = out_dir / "ref.tar.gz"
    start = time.perf_counter()
    spawn(["tar", "czf", str(artifact), "-C", str(app), "."], log)
    spawn(["sha256sum", str(artifact)], log)
    return Run(time.perf_counter() - start, 0, artifact.stat().st_size)


def run_otad(cmd: str, app: Path, key: Path, out_dir: Path, log: Path, env: dict[str, str]) -> Run:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    argv = [cmd, "build", "--app-dir", str(app), "--version", "1.0.0", "--key", str(key), "--out", str(out_dir)]
    _, seconds, rss = spawn(argv, log, env)
    return Run(seconds, rss, (out_dir / "app-v1.0.0.tar.gz").stat().st_size)


ARCHIVE_ONLY = """
import sys
from otad.release.archive import write_archive
with open(sys.argv[2], "wb") as out:
    write_archive(sys.argv[1], "1.0.0", out, 0)
"""


def run_archive_only(app: Path, work: Path, log: Path, env: dict[str, str]) -> Run:
    """Diagnostic: write_archive alone, without loading (scrypt-decrypting) the signing key."""
    artifact = work / "archive-only.tar.gz"
    _, seconds, rss = spawn([sys.executable, "-c", ARCHIVE_ONLY, str(app), str(artifact)], log, env)
    size = artifact.stat().st_size
    artifact.unlink()
    return Run(seconds, rss, size)


def measure(cmd: str, app: Path, key: Path, work: Path, repeat: int, env: dict[str, str]) -> tuple[list[Run], list[Run]]:
    refs: list[Run] = []
    otads: list[Run] = []
    log = work / "run.log"
    for i in range(repeat):
        # Alternate which goes first, so neither always gets the warmer machine.
        order = ("ref", "otad") if i % 2 == 0 else ("otad", "ref")
        for which in order:
            if which == "ref":
                refs.append(run_reference(app, work / "ref-out", log))
            else:
                otads.append(run_otad(cmd, app, key, work / "otad-out", log, env))
    for d in ("ref-out", "otad-out"):
        shutil.rmtree(work / d, ignore_errors=True)
    return refs, otads


def _median(values) -> float:
    return statistics.median(values)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="app folder size in MiB (default 256)")
    parser.add_argument("--small-mb", type=int, default=32, help="second, smaller size for the flat-RSS check (default 32; 0 skips it)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command per size; the median is reported (default 3)")
    parser.add_argument("--seed", type=int, default=20250101, help="seed for the generated app folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.repeat <= 0 or args.small_mb < 0:
        parser.error("--size-mb and --repeat must be positive, --small-mb not negative")

    cmd = _otad_release()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-release-", dir="/tmp"))
    env = dict(os.environ, COSIGN_PASSWORD="")
    env.pop("SOURCE_DATE_EPOCH", None)
    started = time.monotonic()
    try:
        key_prefix = work / "bench"
        subprocess.run([cmd, "keygen", "--output-prefix", str(key_prefix)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        sizes = [args.size_mb] + ([args.small_mb] if args.small_mb and args.small_mb != args.size_mb else [])
        print(f"otad release build benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"repeat {args.repeat}, median reported, work dir {work}")
        log = work / "run.log"
        floor = spawn(["true"], log)[2] / 1024
        imports = spawn([sys.executable, "-c", "import otad.release.cli"], log, env)[2] / 1024
        print(f"peak RSS of `true` (spawn floor): {floor:.1f} MiB; of python importing otad.release.cli: {imports:.1f} MiB")
        rows = []
        for size_mb in sizes:
            app = work / f"app-{size_mb}"
            t0 = time.perf_counter()
            stats = make_app_in_child(app, size_mb * MIB, args.seed)
            mix = ", ".join(f"{k} {n} files/{b / MIB:.0f} MiB" for k, (n, b) in stats.by_kind.items())
            print(f"\n[{size_mb} MiB] generated {stats.files} files in {stats.dirs} folders "
                  f"({stats.total_bytes / MIB:.0f} MiB: {mix}) in {time.perf_counter() - t0:.1f} s")
            refs, otads = measure(cmd, app, key_prefix.with_suffix(".key"), work, args.repeat, env)
            ref_s = _median(r.seconds for r in refs)
            otad_s = _median(r.seconds for r in otads)
            rss_mib = max(r.max_rss_kib for r in otads) / 1024
            print(f"  reference runs: {' '.join(f'{r.seconds:.2f}' for r in refs)} s")
            print(f"  otad runs:      {' '.join(f'{r.seconds:.2f}' for r in otads)} s, "
                  f"peak RSS {' '.join(f'{r.max_rss_kib / 1024:.1f}' for r in otads)} MiB")
            alone = run_archive_only(app, work, work / "run.log", env)
            print(f"  diagnostic, write_archive alone (no key load, no signing, no fsync): "
                  f"{alone.seconds:.2f} s, peak RSS {alone.max_rss_kib / 1024:.1f} MiB")
            rows.append((size_mb, stats.total_bytes, refs[0].artifact_bytes, otads[0].artifact_bytes,
                         ref_s, otad_s, otad_s / ref_s, rss_mib, alone.max_rss_kib / 1024))
            shutil.rmtree(app)

        print()
        header = ("app MiB", "ref .tar.gz MiB", "otad .tar.gz MiB", "tar czf+sha256sum s", "otad build s",
                  "ratio", "otad peak RSS MiB", "write_archive alone RSS MiB")
        table = [header] + [
            (f"{size}", f"{ref_bytes / MIB:.1f}", f"{otad_bytes / MIB:.1f}", f"{ref_s:.2f}", f"{otad_s:.2f}",
             f"{ratio:.2f}", f"{rss:.1f}", f"{alone_rss:.1f}")
            for size, _, ref_bytes, otad_bytes, ref_s, otad_s, ratio, rss, alone_rss in rows
        ]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for n, r in enumerate(table):
            print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
            if n == 0:
                print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")

        big = rows[0]
        print()
        print(f"{_verdict(big[6] <= RATIO_TARGET)}  time ratio otad/reference at {big[0]} MiB: "
              f"{big[6]:.2f} (target <= {RATIO_TARGET})")
        rss_all = [r[7] for r in rows]
        print(f"{_verdict(max(rss_all) < RSS_TARGET_MIB)}  otad peak RSS: "
              f"{', '.join(f'{r[7]:.1f} MiB at {r[0]} MiB' for r in rows)} (target < {RSS_TARGET_MIB:.0f} MiB)")
        print(f"      (write_archive alone: {', '.join(f'{r[8]:.1f} MiB at {r[0]} MiB' for r in rows)}; "
              f"where the rest goes: docs/benchmarks.md)")
        if len(rows) > 1:
            growth = rows[0][7] - rows[1][7]
            print(f"{_verdict(growth <= RSS_FLAT_SLACK_MIB)}  peak RSS flat across sizes: "
                  f"{growth:+.1f} MiB from {rows[1][0]} to {rows[0][0]} MiB (allowed +{RSS_FLAT_SLACK_MIB:.0f})")
        print(f"\ntotal benchmark time {time.monotonic() - started:.0f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
