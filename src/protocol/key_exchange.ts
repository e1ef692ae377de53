/**
 * Version 2's key-exchange frames (README.md, "Version 2: keys"): the client key
 * share, the server key share and the client proof. Pure encode and decode; a
 * decoder returns a reason string for a bad frame. The cryptography is in
 * ../transport/channel_keys.ts.
 */

import {
  ClientKeyShareLayout as CK,
  ClientProofLayout as CP,
  KEY_NAME_BYTES_MAX,
  MAGIC_CLIENT_KEY_SHARE,
  MAGIC_CLIENT_PROOF,
  MAGIC_SERVER_KEY_SHARE,
  NONCE_BYTES,
  PROOF_BYTES,
  PROTECTION_ENCRYPT,
  PROTECTION_MAC,
  PROTOCOL_VERSION_KEYED,
  PUBLIC_KEY_BYTES,
  ServerKeyShareLayout as SK,
} from "./wire.ts";

export interface ClientKeyShare {
  publicKey: Uint8Array;
  /** The name of the key the client proves (a key file line's NAME). */
  keyName: string;
}

export interface ServerKeyShare {
  version: number;
  /** The protection chosen for every record: PROTECTION_MAC or PROTECTION_ENCRYPT. */
  protection: number;
  nonce: Uint8Array;
  publicKey: Uint8Array;
  proof: Uint8Array;
}

const utf8 = new TextEncoder();

export function encodeClientKeyShare(share: ClientKeyShare): Uint8Array {
  const name = utf8.encode(share.keyName);
  if (name.length === 0 || name.length > KEY_NAME_BYTES_MAX) {
    throw new RangeError(`a key name is 1 to ${KEY_NAME_BYTES_MAX} bytes`);
  }
  const bytes = new Uint8Array(CK.SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint32(CK.magic, MAGIC_CLIENT_KEY_SHARE, true);
  bytes.set(share.publicKey.subarray(0, PUBLIC_KEY_BYTES), CK.publicKey);
  view.setUint16(CK.keyNameLength, name.length, true);
  bytes.set(name, CK.keyName);
  return bytes;
}

export function decodeClientKeyShare(bytes: Uint8Array): ClientKeyShare | string {
  if (bytes.length !== CK.SIZE) return `client key share is ${bytes.length} bytes, not ${CK.SIZE}`;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(CK.magic, true) !== MAGIC_CLIENT_KEY_SHARE) {
    return "client key share: bad magic";
  }
  const nameLength = view.getUint16(CK.keyNameLength, true);
  if (nameLength === 0 || nameLength > KEY_NAME_BYTES_MAX) {
    return `client key share: key name of ${nameLength} bytes is not in 1..${KEY_NAME_BYTES_MAX}`;
  }
  let keyName: string;
  try {
    keyName = new TextDecoder("utf-8", { fatal: true }).decode(
      bytes.subarray(CK.keyName, CK.keyName + nameLength),
    );
  } catch {
    return "client key share: the key name is not UTF-8";
  }
  return { publicKey: bytes.slice(CK.publicKey, CK.publicKey + PUBLIC_KEY_BYTES), keyName };
}

/** The server key share without its proof: the part the transcript covers. */
export function encodeServerKeyShareBody(
  share: Omit<ServerKeyShare, "proof">,
): Uint8Array {
  const bytes = new Uint8Array(SK.SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint32(SK.magic, MAGIC_SERVER_KEY_SHARE, true);
  view.setUint16(SK.version, share.version, true);
  view.setUint16(SK.protection, share.protection, true);
  bytes.set(share.nonce.subarray(0, NONCE_BYTES), SK.nonce);
  bytes.set(share.publicKey.subarray(0, PUBLIC_KEY_BYTES), SK.publicKey);
  return bytes.subarray(0, SK.proof);
}

export function encodeServerKeyShare(share: ServerKeyShare): Uint8Array {
  const bytes = new Uint8Array(SK.SIZE);
  bytes.set(encodeServerKeyShareBody(share));
  bytes.set(share.proof.subarray(0, PROOF_BYTES), SK.proof);
  return bytes;
}

export function decodeServerKeyShare(bytes: Uint8Array): ServerKeyShare | string {
  if (bytes.length !== SK.SIZE) return `server key share is ${bytes.length} bytes, not ${SK.SIZE}`;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(SK.magic, true) !== MAGIC_SERVER_KEY_SHARE) {
    return "server key share: bad magic";
  }
  const share = {
    version: view.getUint16(SK.version, true),
    protection: view.getUint16(SK.protection, true),
    nonce: bytes.slice(SK.nonce, SK.nonce + NONCE_BYTES),
    publicKey: bytes.slice(SK.publicKey, SK.publicKey + PUBLIC_KEY_BYTES),
    proof: bytes.slice(SK.proof, SK.proof + PROOF_BYTES),
  };
  if (share.version !== PROTOCOL_VERSION_KEYED) {
    return `server key share: version ${share.version}, not ${PROTOCOL_VERSION_KEYED}`;
  }
  if (share.protection !== PROTECTION_MAC && share.protection !== PROTECTION_ENCRYPT) {
    return `server key share: protection ${share.protection} is neither MAC nor ENCRYPT`;
  }
  return share;
}

export function encodeClientProof(proof: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(CP.SIZE);
  new DataView(bytes.buffer).setUint32(CP.magic, MAGIC_CLIENT_PROOF, true);
  bytes.set(proof.subarray(0, PROOF_BYTES), CP.proof);
  return bytes;
}

export function decodeClientProof(bytes: Uint8Array): Uint8Array | string {
  if (bytes.length !== CP.SIZE) return `client proof is ${bytes.length} bytes, not ${CP.SIZE}`;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(CP.magic, true) !== MAGIC_CLIENT_PROOF) return "client proof: bad magic";
  return bytes.slice(CP.proof, CP.proof + PROOF_BYTES);
}
