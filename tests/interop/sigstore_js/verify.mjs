#!/usr/bin/env node
// Independent, offline, key-based Sigstore bundle verifier built on the official
// @sigstore/verify. Usage:
//   node verify.mjs --key KEY.pub --bundle BUNDLE.json --artifact FILE [--trusted-root ROOT.json]
// Exit 0 + "verified" on success; 1 + the library's reason on failure; 2 on usage error.
import { readFileSync } from 'node:fs';
import { createHash, createPublicKey } from 'node:crypto';
import { parseArgs } from 'node:util';
import { bundleFromJSON } from '@sigstore/bundle';
import { PublicKeyDetails, TrustedRoot } from '@sigstore/protobuf-specs';
import { toSignedEntity, toTrustMaterial, Verifier } from '@sigstore/verify';

const USAGE = 'usage: node verify.mjs --key KEY.pub --bundle BUNDLE.json --artifact FILE [--trusted-root ROOT.json]';
const usage = (msg) => { console.log(msg ? `${msg}; ${USAGE}` : USAGE); process.exit(2); };

let opts, key, bundleJSON, artifact, rootJSON;
try {
  ({ values: opts } = parseArgs({
    options: { key: { type: 'string' }, bundle: { type: 'string' },
      artifact: { type: 'string' }, 'trusted-root': { type: 'string' } },
  }));
} catch (e) { usage(e.message); }
if (!opts.key || !opts.bundle || !opts.artifact) usage('missing argument');
try {
  key = readFileSync(opts.key, 'utf8');
  bundleJSON = readFileSync(opts.bundle, 'utf8');
  artifact = readFileSync(opts.artifact);
  if (opts['trusted-root']) rootJSON = JSON.parse(readFileSync(opts['trusted-root'], 'utf8'));
} catch (e) { usage(e.message); }

try {
  // Bundle parsing + schema validation by @sigstore/bundle (protobuf-specs JSON mapping).
  const bundle = bundleFromJSON(JSON.parse(bundleJSON));
  const spki = createPublicKey(key).export({ type: 'spki', format: 'der' });
  // The operator's key is the only trusted key; the bundle's hint is informational,
  // so the key is registered under whatever hint the bundle carries.
  const hint = bundle.verificationMaterial.content?.$case === 'publicKey'
    ? bundle.verificationMaterial.content.publicKey.hint : '';
  const keys = { [hint]: { rawBytes: spki, keyDetails: PublicKeyDetails.PKIX_ECDSA_P256_SHA_256 } };
  // Without --trusted-root: an empty trusted root (no Rekor, no CT log, no TSA, no CA).
  const root = TrustedRoot.fromJSON(rootJSON ?? {
    mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1',
    tlogs: [], certificateAuthorities: [], ctlogs: [], timestampAuthorities: [],
  });
  const entity = toSignedEntity(bundle, artifact);
  if (!rootJSON) {
    // Key-only mode: nothing can anchor Rekor entries or RFC 3161 timestamps, and
    // @sigstore/verify checks every one present (thresholds only set a minimum),
    // so they are parsed above but dropped from verification here.
    entity.tlogEntries = [];
    entity.timestamps = [];
  }
  const verifier = new Verifier(toTrustMaterial(root, keys),
    { tlogThreshold: 0, ctlogThreshold: 0, timestampThreshold: 0 });
  verifier.verify(entity);
  // @sigstore/verify only compares messageDigest with a tlog body, never with the
  // artifact; check it here (with the library's own digest comparison).
  const sig = entity.signature;
  if (bundle.content.$case === 'messageSignature' &&
      !sig.compareDigest(createHash(sig.hashAlgorithm).update(artifact).digest())) {
    throw Object.assign(new Error('messageDigest does not match the artifact'), { code: 'DIGEST_ERROR' });
  }
  console.log('verified');
  process.exit(0);
} catch (e) {
  const fields = e.fields ? ` (${e.fields.join(', ')})` : '';
  console.log(`${e.code ?? e.constructor?.name ?? 'Error'}: ${e.message}${fields}`.replace(/\s+/g, ' '));
  process.exit(1);
}
