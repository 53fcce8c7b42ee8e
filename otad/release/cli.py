"""`otad-release`: keygen, sign, verify, build, refresh, publish, rollout. Thin: parse, call, report."""
from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

from otad.cli import ArgumentParser, run
from otad.errors import KeyFileError
from otad.fsutil import atomic_write_bytes, create_exclusive
from otad.release.build import (
    DEFAULT_EXPIRES_DAYS,
    MANIFEST,
    build_release,
    publish_release,
    read_manifest_file,
    refresh_manifest,
)
from otad.release.rollout_cli import add_rollout_parser
from otad.release.signers import CosignSigner, GpgSigner, Signer
from otad.trust.digest import digest_file
from otad.trust.keys import generate_key_pair, load_private_key, load_public_key_files
from otad.trust.metadata import MANIFEST_BUNDLE, verify_manifest
from otad.trust.verify import TrustAnchors, verify_artifact, verify_cosign_signature
from otad.trust import gpg

PROG = "otad-release"


def _password(confirm: bool) -> bytes:
    if "COSIGN_PASSWORD" in os.environ:
        return os.environ["COSIGN_PASSWORD"].encode("utf-8")
    if not sys.stdin.isatty():
        raise KeyFileError("set COSIGN_PASSWORD (the empty string is allowed) or run on a terminal")
    first = getpass.getpass("Enter password for private key: ")
    if confirm and getpass.getpass("Enter password for private key again: ") != first:
        raise KeyFileError("passwords do not match")
    return first.encode("utf-8")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what} ({exc.strerror})") from None


def _signer(args) -> Signer:
    if args.gpg_key:
        if not args.gpg_home:
            raise KeyFileError("--gpg-key needs --gpg-home")
        return GpgSigner(args.gpg_home, args.gpg_key, os.environ.get("OTAD_GPG_PASSPHRASE"))
    if not args.key:
        raise KeyFileError("give --key (cosign) or --gpg-home and --gpg-key")
    key = load_private_key(_read(args.key, "private key"), _password(confirm=False), args.key)
    return CosignSigner(key, legacy=getattr(args, "legacy", False))


def cmd_keygen(args) -> int:
    key_path, pub_path = Path(args.output_prefix + ".key"), Path(args.output_prefix + ".pub")
    if not args.force:
        for path in (key_path, pub_path):
            if path.exists():
                raise KeyFileError(f"{path} exists; refusing to overwrite it without --force")
    private_pem, public_pem = generate_key_pair(_password(confirm=True))
    if args.force:
        atomic_write_bytes(key_path, private_pem, mode=0o600)
        atomic_write_bytes(pub_path, public_pem)
    else:
        create_exclusive(key_path, private_pem, 0o600)
        create_exclusive(pub_path, public_pem, 0o644)
    print(f"Private key written to {key_path}")
    print(f"Public key written to {pub_path}")
    return 0


def cmd_sign(args) -> int:
    signer = _signer(args)
    try:
        digest = digest_file(args.file)
    except OSError as exc:
        raise KeyFileError(f"{args.file}: cannot read ({exc.strerror})") from None
    atomic_write_bytes(args.bundle, signer.sign(args.file, digest))
    print(f"Wrote {signer.kind} signature for {args.file} to {args.bundle}")
    return 0


def _anchors(args) -> TrustAnchors:
    keys = tuple(load_public_key_files(args.key or []))
    keyring = _read(args.gpg_keyring, "gpg keyring") if args.gpg_keyring else None
    return TrustAnchors(cosign_keys=keys, gpg_keyring=keyring)


def cmd_verify(args) -> int:
    anchors = _anchors(args)
    if args.manifest:
        base = Path(args.manifest).parent
        read_manifest_file(args.manifest)  # one-line errors for unreadable or malformed files
        signed = verify_manifest(_read(args.manifest, "manifest"), _read(str(base / MANIFEST_BUNDLE), "manifest bundle"),
                                 anchors, time.time())
        manifest = signed.manifest
        verified = verify_artifact(
            base / manifest.artifact,
            manifest,
            _read(str(base / manifest.bundle), "signature"),
            anchors,
            checksum_bytes=_read(str(base / manifest.checksum), "checksum file"),
        )
        print(f"verified {manifest.artifact} ({manifest.name} {manifest.version}, sha256 {verified.sha256[:12]}..., key {verified.key})")
        print(f"verified {MANIFEST} (key {signed.key}, expires {manifest.expires}"
              f"{', allows a downgrade' if manifest.allow_downgrade else ''})")
        return 0
    if not args.file or not args.bundle:
        raise KeyFileError("give FILE and --bundle, or --manifest")
    signature = _read(args.bundle, "bundle")
    if args.gpg_keyring:
        who = gpg.verify_detached(anchors.gpg_keyring, signature, args.file)
    else:
        try:
            digest = digest_file(args.file)
        except OSError as exc:
            raise KeyFileError(f"{args.file}: cannot read ({exc.strerror})") from None
        who = verify_cosign_signature(digest.sha256, signature, anchors.cosign_keys).name
    print(f"verified {args.file}: key {who}")
    return 0


def cmd_build(args) -> int:
    manifest = build_release(args.app_dir, args.version, args.name, args.out, _signer(args),
                             expires_in_days=args.expires_in, allow_downgrade=args.allow_downgrade)
    for file_name in (*manifest.files, MANIFEST_BUNDLE, MANIFEST):
        print(os.path.join(args.out, file_name))
    return 0


def cmd_refresh(args) -> int:
    manifest = refresh_manifest(args.from_dir, _signer(args), args.expires_in)
    print(f"{manifest.name} {manifest.version}: manifest now expires {manifest.expires}; "
          f"publish {args.from_dir} again to send it out")
    return 0


def cmd_publish(args) -> int:
    manifest = publish_release(args.from_dir, args.to_dir)
    print(f"published {manifest.name} {manifest.version} to {args.to_dir}")
    return 0


def _add_signing_options(parser) -> None:
    parser.add_argument("--key", help="cosign private key file (password from COSIGN_PASSWORD)")
    parser.add_argument("--gpg-home", help="GnuPG home holding the signing key")
    parser.add_argument("--gpg-key", help="GnuPG key id or fingerprint to sign with")


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not -36500 <= value <= 36500:
        raise argparse.ArgumentTypeError(f"{text!r} days is out of range")
    return value


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Build, sign, verify and publish otad releases.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("keygen", help="write a cosign-compatible key pair PATH.key / PATH.pub")
    p.add_argument("--output-prefix", required=True, metavar="PATH")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(handler=cmd_keygen)

    p = sub.add_parser("sign", help="sign FILE into a Sigstore bundle (or a gpg .asc)")
    _add_signing_options(p)
    p.add_argument("--bundle", required=True, metavar="OUT", help="where to write the bundle or signature")
    p.add_argument("--legacy", action="store_true", help='write the legacy {"base64Signature": ...} form')
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=cmd_sign)

    p = sub.add_parser("verify", help="verify FILE against --bundle, or a whole release via --manifest")
    p.add_argument("--key", action="append", metavar="PUB", help="trusted public key or folder of *.pub (repeatable)")
    p.add_argument("--gpg-keyring", metavar="FILE", help="trusted GnuPG public keys (exported, binary or armored)")
    p.add_argument("--bundle", metavar="BUNDLE")
    p.add_argument("--manifest", metavar="MANIFEST", help="verify the release this manifest.json describes")
    p.add_argument("file", metavar="FILE", nargs="?")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("build", help="package, checksum, sign an app folder and write manifest.json")
    p.add_argument("--app-dir", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--out", required=True, metavar="OUTDIR")
    p.add_argument("--name", default="app")
    p.add_argument("--expires-in", type=_days, default=DEFAULT_EXPIRES_DAYS, metavar="DAYS",
                   help=f"the manifest expires this many days from now (default {DEFAULT_EXPIRES_DAYS:g}; may be fractional)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="authorise robots that run a higher version to go down to this one")
    _add_signing_options(p)
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("refresh", help="give a built release's manifest a new expiry and sign it again")
    p.add_argument("--from", dest="from_dir", required=True, metavar="OUTDIR")
    p.add_argument("--expires-in", type=_days, default=DEFAULT_EXPIRES_DAYS, metavar="DAYS")
    _add_signing_options(p)
    p.set_defaults(handler=cmd_refresh)

    p = sub.add_parser("publish", help="copy a built release into the dashboard's OTA folder")
    p.add_argument("--from", dest="from_dir", required=True, metavar="OUTDIR")
    p.add_argument("--to", dest="to_dir", required=True, metavar="OTA_DIR")
    p.set_defaults(handler=cmd_publish)

    add_rollout_parser(sub, ArgumentParser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(PROG, lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
