"""``edgeship keys``, ``sign``, ``verify`` and ``encrypt``: the workstation's half of bundle trust
(the board's half is ``trusted_keys`` and ``model_key_file``; see ``docs/security.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdk.terminal import printable

__all__ = ["add_trust_parsers"]


def add_trust_parsers(sub: Any) -> None:
    """Add ``keys``, ``sign``, ``verify`` and ``encrypt`` to the ``edgeship`` subcommands."""
    p = sub.add_parser(
        "keys",
        help="make signing and model-encryption keys, show a key's fingerprint",
        description="Make an Ed25519 key pair for signing bundles (the private key stays on this "
        "workstation, the public key goes to the boards' trusted_keys), or an AES-256 key for "
        "encrypting models at rest (--symmetric; it goes to the boards' model_key_file).",
        epilog="examples:\n"
        "  edgeship keys generate --out ~/.edgeship/keys --name release-2026\n"
        "  edgeship keys generate --symmetric --out ~/.edgeship/keys --name greenhouse\n"
        "  edgeship keys fingerprint ~/.edgeship/keys/release-2026.pub.pem\n"
        "see docs/security.md, 'Bundle signing and encryption'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="keys_command", metavar="ACTION")
    q = actions.add_parser(
        "generate",
        help="write a new key (never overwrites one)",
        description="Write NAME.pem (private, mode 0600) and NAME.pub.pem, or with --symmetric "
        "NAME.key (AES-256, base64, mode 0600), into --out, and print the key's fingerprint. "
        "Refuses to overwrite an existing file.",
        epilog="example: edgeship keys generate --out ~/.edgeship/keys --name release-2026",
    )
    q.add_argument("--out", type=Path, required=True, help="directory for the key files")
    q.add_argument("--name", help="file name stem (default edgeship-signing / edgeship-model)")
    q.add_argument(
        "--symmetric", action="store_true", help="an AES-256 model key instead of a key pair"
    )
    q.set_defaults(handler=_cmd_keys_generate)
    q = actions.add_parser(
        "fingerprint",
        help="print the fingerprint of a public, private or model key file",
    )
    q.add_argument("key", type=Path)
    q.set_defaults(handler=_cmd_keys_fingerprint)
    p.set_defaults(handler=_help(p))

    p = sub.add_parser(
        "sign",
        help="sign a bundle's manifest with an Ed25519 private key",
        description="Verify every file of BUNDLE against its manifest (a damaged or tampered "
        "bundle is refused), then sign manifest.json's bytes with --key and write the "
        "signature to BUNDLE/signature.json. Signing again with another key adds a signature "
        "(key rotation); signatures over an older manifest are dropped.",
        epilog="example: edgeship sign bundle/ --key ~/.edgeship/keys/release-2026.pem\n"
        "(make a key pair first: edgeship keys generate --out ~/.edgeship/keys)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="the private key (NAME.pem)")
    p.set_defaults(handler=_cmd_sign)

    p = sub.add_parser(
        "verify",
        help="check a bundle as a board with trusted_keys would",
        description="Refuse BUNDLE unless it is signed by one of the --trusted-key public keys, "
        "the signature verifies, and every file matches its SHA-256: exactly the check "
        "edgeship-agent makes with trusted_keys configured.",
        epilog="example: edgeship verify bundle/ --trusted-key "
        "~/.edgeship/keys/release-2026.pub.pem",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        type=Path,
        required=True,
        metavar="PUBLIC.pem",
        help="a trusted public key (repeatable)",
    )
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser(
        "encrypt",
        help="encrypt a bundle's model at rest with an AES-256 key (in place)",
        description="Verify BUNDLE, then replace its model file with an AES-256-GCM encrypted "
        "copy (MODEL.enc) and record the key's id and the nonce in the manifest (format "
        "version 2). Boards need the same key as model_key_file; they decrypt in memory only. "
        "The manifest changes, so an existing signature is removed: sign the bundle afterwards.",
        epilog="example (encrypt, then sign):\n"
        "  edgeship encrypt bundle/ --key ~/.edgeship/keys/greenhouse.key\n"
        "  edgeship sign bundle/ --key ~/.edgeship/keys/release-2026.pem\n"
        "(make a model key first: edgeship keys generate --symmetric --out ~/.edgeship/keys)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="the model key file (NAME.key)")
    p.set_defaults(handler=_cmd_encrypt)


def _help(p: argparse.ArgumentParser) -> Any:
    def show(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    return show


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from sdk.signing import generate_model_key, generate_signing_key

    if args.symmetric:
        key = generate_model_key(args.out, *([args.name] if args.name else []))
        print(f"wrote {key.private} (AES-256 model key, mode 0600)")
        print(f"key id {key.key_id}")
        print("copy it to each board that runs encrypted bundles and set model_key_file to it;")
        print(f"encrypt bundles with: edgeship encrypt BUNDLE --key {key.private}")
        return 0
    key = generate_signing_key(args.out, *([args.name] if args.name else []))
    print(f"wrote {key.private} (private key, mode 0600: keep it on this workstation)")
    print(f"wrote {key.public} (public key: add it to the boards' trusted_keys)")
    print(f"fingerprint {key.key_id}")
    print(f"sign bundles with: edgeship sign BUNDLE --key {key.private}")
    return 0


def _cmd_keys_fingerprint(args: argparse.Namespace) -> int:
    from sdk.signing import key_fingerprint

    kind, key_id = key_fingerprint(args.key)
    print(f"{key_id}  {kind}  {args.key}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from sdk.signing import sign_bundle

    bundle, key_id = sign_bundle(args.bundle, args.key)
    m = bundle.manifest
    # The manifest's names and the other signers' ids are the bundle maker's text.
    name, version = printable(m.model.name), printable(m.model.version)
    print(
        f"signed {printable(bundle.root)} ({name} v{version}, {len(m.files)} file(s) verified) "
        f"with {printable(key_id)}"
    )
    others = [s for s in bundle.signature.signers if s != key_id]
    if others:
        print(f"also signed by {printable(', '.join(others))} (kept: same manifest)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from sdk.signing import verify_bundle

    bundle = verify_bundle(args.bundle, args.trusted_key)
    m = bundle.manifest
    name, version = printable(m.model.name), printable(m.model.version)
    print(f"bundle     {printable(bundle.root)}: {name} v{version}")
    print(f"signature  {printable(bundle.signature.describe())}")
    print(f"verified   {len(m.files)} file(s) match their SHA-256")
    print("ok")
    return 0


def _cmd_encrypt(args: argparse.Namespace) -> int:
    from sdk.signing import encrypt_bundle

    bundle, had_signature = encrypt_bundle(args.bundle, args.key)
    info = bundle.manifest.model.encryption
    assert info is not None
    model = printable(f"{bundle.root}/{bundle.manifest.model.file}")
    print(
        f"encrypted {model} ({printable(info.algorithm)}, key {printable(info.key_id)}); the "
        "plain model file was deleted"
    )
    if had_signature:
        print(
            "the manifest changed, so its old signature was removed; sign it again with: "
            f"edgeship sign {bundle.root} --key PRIVATE.pem"
        )
    return 0
